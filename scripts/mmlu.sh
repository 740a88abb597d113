#!/usr/bin/env bash
# Set up (if needed) and run MMLU 0-shot on the embedded SmolLM2-135M-Instruct, BF16, in the
# letter and cloze formulations, on a stratified subset of 20 questions per subject (1,140).
# Other `evalsuite run` options to change it (the formulations are the runner's default, so a
# --formulation given here replaces them); rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec evalsuite run mmlu --model smollm2-135m --recipe bf16 --per-subject 20 "$@"
