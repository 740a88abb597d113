"""A small random Llama in an HF folder (safetensors, BF16) with a registered model's tokenizer and
chat template: something every command can load, small enough to copy to another machine.

    python bench/make_random_model.py --out .gpu/model                 # SmolLM2's tokenizer, 4 layers x 128
    python bench/make_random_model.py --out DIR --hidden 512 --layers 8

Its numbers mean nothing (random weights); it exists to run the commands end to end on a device
where the real weights cannot go (bench/gpu_commands.sh).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer-from", default="smollm2-135m", help="a registered model whose tokenizer is used")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    if args.hidden % 64 or args.hidden < 128 or args.layers < 1:
        p.error(f"--hidden must be a multiple of 64 of at least 128 and --layers >= 1, got {args.hidden}, {args.layers}")

    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from evalsuite.engine.load import resolve_source

    source, _, _ = resolve_source(args.tokenizer_from)
    ref = AutoConfig.from_pretrained(source)
    heads = args.hidden // 64
    cfg = LlamaConfig(vocab_size=ref.vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=ref.max_position_embeddings, rms_norm_eps=ref.rms_norm_eps,
                      tie_word_embeddings=True, bos_token_id=ref.bos_token_id, eos_token_id=ref.eos_token_id,
                      pad_token_id=getattr(ref, "pad_token_id", None),
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2 ** 20
    print(f"{out}: random Llama, {args.layers} layers x {args.hidden}, vocab {cfg.vocab_size}, "
          f"tokenizer of {args.tokenizer_from}; {size:.1f} MiB")


if __name__ == "__main__":
    main()
