"""The FP8 KV-cache scales fp8-modelopt calibrates on the embedded SmolLM2, in both scale modes:
the range over layers of the K and V absmax, of the ``simulate`` scales (amax / 448) and how many
``deploy`` floors at 1.0 (docs/RESULTS.md, "KV cache scales").

    python bench/kv_scales.py
"""

from __future__ import annotations

from evalsuite.models import load_model_and_recipe


def main() -> None:
    for mode in ("simulate", "deploy"):
        lm, _ = load_model_and_recipe("smollm2-135m", "fp8-modelopt", "bfloat16", {"kv_scale_mode": mode})
        layers = lm.model.model.layers
        for point in ("k_cache_quant", "v_cache_quant"):
            scales = [getattr(layer.self_attn, point).scale for layer in layers]
            floored = sum(s == 1.0 for s in scales)
            print(f"{mode:8s} {point[0].upper()}: scales {min(scales):.4f}-{max(scales):.4f}"
                  + (f" (absmax {min(scales) * 448:.2f}-{max(scales) * 448:.2f})" if mode == "simulate" else "")
                  + f", {floored} of {len(scales)} at 1.0")


if __name__ == "__main__":
    main()
