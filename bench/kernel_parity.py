"""Real low-bit kernels against the simulated reference, on the embedded SmolLM2 (CPU).

    python bench/kernel_parity.py [--per-subject 2]

Per recipe with a real path (fp8-official and fp8-modelopt through ``torch._scaled_mm``, row-wise
and per-tensor; int4-awq and int4-awq-asym through the packed INT4 kernel for every call):
  * logits relative error ||real - sim|| / ||sim|| over the full vocabulary at the last position
    of MMLU letter prompts (target <= 1e-2; the worst prompt is reported);
  * MMLU 0-shot on a stratified subset in both formulations: the share of identical predictions
    (target >= 99%) and the mean KL of the choice distributions.
Per recipe also the drift through the layers: the relative difference of the hidden states
after each decoder layer, real path against simulation, on the first prompt.
With ``--noise-floor`` the simulation is also run with every quantized projection's input
channels permuted (the same sums in another order, as another correct kernel would add them):
the distance between those two simulations is what any change of summation order costs on this
model, the yardstick for the real-vs-simulated distance.
Runs resume from reports/results/parity/<recipe>-<kernel>/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from recipes_mmlu import records_by_formulation  # bench/, next to this script

from evalsuite.models import load_model_and_recipe
from evalsuite.runners.mmlu import MMLUConfig, load_mmlu, render_context, run_mmlu, select
from evalsuite.stats import paired_changes
from evalsuite.taskdef import load_task

# recipe -> (simulated setting, real setting) of its ``kernel`` option
PATHS = {
    "fp8-official": ("off", "scaled_mm"),
    "fp8-modelopt": ("off", "scaled_mm"),
    "int4-awq": ("off", "always"),
    "int4-awq-asym": ("off", "always"),
}
FORMULATIONS = ("letter", "cloze")


def prompts(n: int) -> list[str]:
    task = load_task("mmlu")
    form = task.formulation("letter")
    _, qs = select(load_mmlu(task), task, MMLUConfig(per_subject=1))
    return [render_context(form, q, []) for q in qs[:n]]


@torch.inference_mode()
def last_logits(lm, texts: list[str]) -> list[torch.Tensor]:
    return [lm.model(torch.tensor([lm.tokenizer.encode(t)]))[0, -1].float() for t in texts]


def permute_inputs(model, seed: int = 0) -> None:
    """Permute the input channels of every quantized projection (weights and inputs alike)."""
    from evalsuite.quant.api import module_types

    g = torch.Generator().manual_seed(seed)
    types = tuple(module_types().values())
    for m in model.modules():
        if type(m) in types and hasattr(m, "qweight"):
            perm = torch.randperm(m.qweight.shape[1], generator=g)
            m.qweight = m.qweight[:, perm].contiguous()
            if m.qweight_f32.numel():  # the simulation's float32 copy (FP8 kernels have none)
                m.qweight_f32 = m.qweight_f32[:, perm].contiguous()
            m.register_forward_pre_hook(lambda _m, args, perm=perm: (args[0][..., perm],))


@torch.inference_mode()
def layer_states(lm, text: str) -> list[torch.Tensor]:
    """The hidden states after each decoder layer (forward hooks on the layers)."""
    states = []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: states.append(out.float()))
             for layer in lm.model.model.layers]
    try:
        lm.model(torch.tensor([lm.tokenizer.encode(text)]))
    finally:
        for h in hooks:
            h.remove()
    return states


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-subject", type=int, default=2)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--recipes", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--noise-floor", action="store_true", help="also the simulation with permuted sums (FP8 recipes)")
    args = p.parse_args()
    texts = prompts(args.prompts)
    cfg = MMLUConfig(formulations=FORMULATIONS, per_subject=args.per_subject)
    rows = []
    for recipe in args.recipes:
        runs, logits = {}, {}
        sim, real = PATHS[recipe]
        variants = [sim, real] + (["permuted"] if args.noise_floor and recipe.startswith("fp8") else [])
        states = {}
        for variant in variants:
            lm, record = load_model_and_recipe("smollm2-135m", recipe, "bfloat16",
                                               {"kernel": sim if variant == "permuted" else variant})
            if variant == "permuted":
                permute_inputs(lm.model)
                record = {**record, "note": "simulated, input channels of quantized projections permuted"}
            logits[variant] = last_logits(lm, texts)
            states[variant] = layer_states(lm, texts[0])
            run_dir = Path("reports/results/parity") / f"{recipe}-{variant}"
            run_mmlu(lm, cfg, run_dir, recipe=record, progress=False)
            runs[variant] = records_by_formulation(run_dir)
        for other in variants[1:]:
            drift = [float((a - b).norm() / b.norm()) for a, b in zip(states[other], states[sim])]
            print(f"{recipe} ({other} vs simulated) hidden-state drift after layers 1..{len(drift)}: "
                  + " ".join(f"{d:.1e}" for d in drift), flush=True)
            rel = max(float((r - s).norm() / s.norm()) for r, s in zip(logits[other], logits[sim]))
            for form in FORMULATIONS:
                ch = paired_changes(runs[sim][form], runs[other][form])
                rows.append((recipe, other, form, rel, ch))
                print(f"{recipe} ({other} vs simulated) {form}: logits rel. error (worst of {len(texts)}) {rel:.2e}, "
                      f"identical {1 - ch['changed_share']:.2%} of {ch['n']}, mean KL {ch['mean_kl']:.2e}", flush=True)
    print("\n| recipe | compared with the simulation | formulation | logits rel. error (worst) | identical predictions "
          "| mean KL |")
    print("| --- | --- | --- | --- | --- | --- |")
    for recipe, real, form, rel, ch in rows:
        print(f"| {recipe} | {real} | {form} | {rel:.2e} | {1 - ch['changed_share']:.2%} "
              f"({ch['n'] - ch['changed']}/{ch['n']}) | {ch['mean_kl']:.2e} |")


if __name__ == "__main__":
    main()
