#!/usr/bin/env bash
# Set up (if needed) and run the study on the embedded SmolLM2-135M-Instruct: every recipe on an
# MMLU subset and a perplexity subset, the throughput benchmark, the comparison against the
# official FP8 recipe, and the report in reports/study/report/. Rerunning resumes; --full is
# the full-size study; other `evalsuite study` options can be appended.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec evalsuite study "$@"
