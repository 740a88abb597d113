"""llm-compressor's own checkpoint of the embedded SmolLM2 (BF16), calibrated on the sequences the
recipes calibrate on (the default sampled corpus), for comparing with int4-gptq and int8-w8a8 on
the same text (docs/RESULTS.md):

  w4a16  GPTQModifier with symmetric INT4 weights in groups of 64 (compressed-tensors' form needs
         whole groups, and SmolLM2's 576 inputs take none of 128): int4-gptq with block_size=64;
  w8a8   SmoothQuantModifier(smoothing_strength=0.8), then GPTQModifier with the W8A8 scheme, as
         llm-compressor's INT8 example runs them: int8-w8a8.

    python bench/llm_compressor_reference.py --scheme w8a8 --out /tmp/i8/smol-llmc
    evalsuite run perplexity --model /tmp/i8/smol-llmc --recipe int8-w8a8 --per-article 1 --output ...

Takes 6-12 minutes on a 2-core CPU (llm-compressor traces the model and runs every layer twice
per modifier).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scheme", choices=("w4a16", "w8a8"), required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evalsuite.engine.load import load
    from evalsuite.quant.calibrate import corpus
    from evalsuite.quant.configs import CalibrationSpec

    lm = load("smollm2-135m", "bfloat16")
    sequences = corpus(lm, CalibrationSpec())
    folder = str(lm.folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    data = Dataset.from_dict({"input_ids": sequences, "attention_mask": [[1] * len(s) for s in sequences]})
    if args.scheme == "w4a16":
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
        recipe = [GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                               ignore=["lm_head"])]
    else:
        recipe = [SmoothQuantModifier(smoothing_strength=0.8),
                  GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    t = time.perf_counter()
    oneshot(model=hf, processor=folder, dataset=data, num_calibration_samples=len(sequences),
            max_seq_length=max(map(len, sequences)), shuffle_calibration_samples=False, recipe=recipe)
    print(f"oneshot took {time.perf_counter() - t:.0f} s")
    hf.save_pretrained(args.out, save_compressed=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(args.out)


if __name__ == "__main__":
    main()
