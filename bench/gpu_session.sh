#!/usr/bin/env bash
# Everything a lent GPU machine should run, as one command that fits its 10-minute limit: every
# command on --device cuda first (bench/gpu_commands.sh: never yet run on a GPU), then the figures
# of bench/gpu_check.py (what the targets are judged on; two earlier runs are in docs/gpu/), then
# where a decode step's time goes (bench/gpu_profile.py).
# Each part has its own time limit, so one that hangs costs only its own share; each part's
# output goes to $OUT/<part>.txt (the device machine returns $OUT), gpu_commands' logs to
# $OUT/gpu_commands_logs.tgz.
#
# Here, beforehand (both outputs are git-ignored; carry them with the repository):
#   bash bench/gpu_wheels.sh && .venv/bin/python bench/make_random_model.py --out .gpu/model
# There:
#   bash bench/gpu_session.sh            # carry: .gpu .whl
set -u
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
status=0

part() {  # part NAME SECONDS command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit $limit s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 60 "$OUT/$name.txt"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/nvidia-smi.txt"
part gpu_commands 290 env DEVICE=cuda WORK=/tmp/gpu_commands bash bench/gpu_commands.sh
# every step's whole log and run record come back too (small text files; the checkpoint stays)
(cd /tmp/gpu_commands 2>/dev/null && find . \( -name '*.log' -o -name run.json \) -print0 \
    | tar czf "$OUT/gpu_commands_logs.tgz" --null -T -)
part gpu_check 200 python3 bench/gpu_check.py --recipes fp8-modelopt fp8-official int4-awq int4-awq:resmooth=false
part gpu_profile 90 python3 bench/gpu_profile.py --batches 1 64 --compile --max-len 2048
exit $status
