#!/usr/bin/env bash
# Everything a lent GPU machine should run, as one command that fits its 10-minute limit: every
# command on --device cuda first (bench/gpu_commands.sh; docs/gpu/ holds its runs), then the figures
# of bench/gpu_check.py (what the targets are judged on; its runs are in docs/gpu/ too), then
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

# every part ends by this many seconds after the start, whatever its own limit (a device call's
# command runs for at most 600 s; what comes back must be written by then)
DEADLINE=${DEADLINE:-575}

part() {  # part NAME SECONDS command...
    local name=$1 limit=$2
    shift 2
    [ "$limit" -le $((DEADLINE - SECONDS)) ] || limit=$((DEADLINE - SECONDS))
    if [ "$limit" -lt 10 ]; then echo "== $name: skipped, $limit s left"; status=1; return; fi
    echo "== $name (limit $limit s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    # a part cut off leaves nothing running into the next one (gpu_commands' lanes and server)
    [ "$rc" -ne 124 ] || pkill -9 -f 'gpu_commands.sh|python3 -m evalsuite' 2>/dev/null
    tail -n 60 "$OUT/$name.txt"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    # what still runs after it (a leftover process slows the next part's launch-bound figures)
    echo "== after $name: load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null); busiest processes:"
    ps -eo pid,pcpu,etimes,args --sort=-pcpu 2>/dev/null | grep -v ' ps -eo' | head -n 6 | cut -c1-160
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/nvidia-smi.txt"
# PARTS: which parts, in order (a short lease: PARTS="commands small" DEADLINE=230)
for p in ${PARTS:-commands check profile}; do
    case $p in
    commands)
        part gpu_commands 220 env DEVICE=cuda LANES=parallel WORK=/tmp/gpu_commands bash bench/gpu_commands.sh
        # every step's whole log and run record come back too (small text files; the checkpoint stays)
        (cd /tmp/gpu_commands 2>/dev/null && find . \( -name '*.log' -o -name run.json \) -print0 \
            | tar czf "$OUT/gpu_commands_logs.tgz" --null -T -) ;;
    # the recipes with targets first (int4-awq has no 8B figure since 2026-11-27; on 2026-11-30 the part's
    # 240 s ran out during it), int8-w8a8 last: GPTQ over 8B shapes may take the rest of the part
    check)
        part gpu_check 300 python3 bench/gpu_check.py --recipes int4-awq fp8-modelopt fp8-official int8-w8a8 ;;
    small)  # gpu_check's correctness figures on SmolLM2's shapes, its real kernels against simulation
        part gpu_check_small 120 python3 bench/gpu_check.py --shapes smollm2-135m --quick \
            --recipes int8-w8a8 fp8-modelopt int4-awq ;;
    # (without --compile: on 2026-11-30 the compiled step was slower, 7.05 against 5.85 ms, and took 48 s)
    profile) part gpu_profile 90 python3 bench/gpu_profile.py --batches 1 64 --max-len 2048 ;;
    *) echo "unknown part $p (commands, check, small, profile)"; status=1 ;;
    esac
done
exit $status
