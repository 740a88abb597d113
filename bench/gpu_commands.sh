#!/usr/bin/env bash
# Every command that takes --device, end to end on one device, with a small random model (its
# numbers mean nothing; the point is that each command runs there): run mmlu (three
# formulations; BF16, FP8 with torch._scaled_mm, INT4 AWQ), a gate, run perplexity, quantize and
# run the quantized checkpoint, export Model Optimizer's FP8 and AutoAWQ's form and run them as published, lm-eval tasks (run --harness lm-eval, and lm-eval's own command line),
# bench, study (runs, benchmark and report), serve, and through the server: MMLU over the endpoint and MT-Bench answered on the
# device and judged by the server with the openai client.
#
#   python bench/make_random_model.py --out .gpu/model      # once, where the tokenizer's model is
#   DEVICE=cuda bash bench/gpu_commands.sh                   # on the GPU machine (python3 with torch)
#   DEVICE=cpu PYTHON=.venv/bin/python bash bench/gpu_commands.sh        # the same here
#   LANES=parallel DEVICE=cuda bash bench/gpu_commands.sh    # its eight lanes at once (a GPU machine's cores)
#
# The steps form eight lanes, each depending on nothing outside itself (lane_a ... lane_h below).
# LANES=parallel runs them side by side, each with its own calibration cache, and prints each
# lane's lines when all are done; by default they run one after another.
#
# Packages the GPU machine lacks travel as wheels in .whl/ (bench/gpu_wheels.sh lists and fetches
# them); this script installs them into $SITE when that folder exists and $PYTHON lacks them.
# lm-eval's heavy dependencies (pyarrow through datasets, sacrebleu, scikit-learn) are not carried:
# the GPU machines' image has them, and 101 MB of them would not fit in the 64 MiB a call carries.
# Where lm-eval does not import, its two steps are reported as skipped, with the reason. Prints
# one line per step and the tail of each failing step's log; exits 1 if any step failed.
set -u
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-.gpu/model}
WORK=${WORK:-/tmp/gpu_commands}
PORT=${PORT:-8765}
PYTHON=${PYTHON:-python3}
# The folder's name must end in site-packages: datasets fingerprints every Dataset with dill, which
# pickles a module by value (and fails on pyarrow's types) unless its path is under sys.prefix or
# contains "site-packages"; with /tmp/site, every lm-eval task failed to load.
SITE=${SITE:-/tmp/gpu-site/site-packages}
if [ -d .whl ] && ! "$PYTHON" -c "import openai, fastapi, uvicorn, lm_eval" 2>/dev/null; then
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl; then  # no pip there: a wheel is a zip of what goes into site-packages
        echo "pip install of .whl/ failed; unpacking the wheels into $SITE instead"
        for w in .whl/*.whl; do "$PYTHON" -m zipfile -e "$w" "$SITE" || { echo "unpacking $w failed"; exit 1; }; done
    fi
    export PYTHONPATH=$SITE:${PYTHONPATH:-}
fi
EVALSUITE="$PYTHON -m evalsuite"
LANES=${LANES:-sequential}
case $LANES in sequential|parallel) ;; *) echo "LANES=$LANES: expected sequential or parallel"; exit 2;; esac
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
rm -rf "$WORK"; mkdir -p "$WORK"
# failed and skipped steps, one name per line: files, so that lanes run in subshells can add to them
: >"$WORK/failed-steps"; : >"$WORK/skipped-steps"

step() {  # step NAME command...
    local name=$1; shift
    local t0=$SECONDS
    if "$@" >"$WORK/$name.log" 2>&1; then
        echo "ok     $name ($((SECONDS - t0)) s)"
        grep -E '^\[[a-z]+\] [a-z_]+:|token_perplexity|\] score|quantized modules|^  [a-z0-9-]+ +[0-9]+/[0-9]+ |^score|^device|^gate |^study ' \
            "$WORK/$name.log" | head -n 6 | cut -c1-160 | sed 's/^/    /'
        # the run record's device and kernel path, where the step wrote one
        if [ -f "$WORK/$name/run.json" ]; then
            "$PYTHON" -c "import json, sys; b = json.load(open(sys.argv[1]))['backend']; \
print('    device:', b.get('device_name'), '| kernel path:', b.get('kernel_path'))" "$WORK/$name/run.json"
        fi
    else
        echo "FAILED $name ($((SECONDS - t0)) s): $*"
        tail -n 30 "$WORK/$name.log" | sed 's/^/    /'
        echo "$name" >>"$WORK/failed-steps"
    fi
}

run=($EVALSUITE run)
common=(--device "$DEVICE" --no-progress)

lane_a() {  # runs of MMLU: BF16 (three formulations), both FP8 recipes
step mmlu-bf16 "${run[@]}" mmlu --model "$MODEL" --recipe bf16 "${common[@]}" --formulation letter cloze generative \
    --num-fewshot 1 --per-subject 1 --output "$WORK/mmlu-bf16"
step mmlu-fp8-modelopt "${run[@]}" mmlu --model "$MODEL" --recipe fp8-modelopt --recipe-config 'kernel="scaled_mm"' \
    "${common[@]}" --num-fewshot 1 --per-subject 1 --output "$WORK/mmlu-fp8-modelopt"
step mmlu-fp8-official "${run[@]}" mmlu --model "$MODEL" --recipe fp8-official --recipe-config 'kernel="scaled_mm"' \
    "${common[@]}" --num-fewshot 1 --per-subject 1 --output "$WORK/mmlu-fp8-official"
}

lane_b() {  # INT4 AWQ, a gate with it as the candidate, perplexity
step mmlu-int4-awq "${run[@]}" mmlu --model "$MODEL" --recipe int4-awq "${common[@]}" --num-fewshot 1 --per-subject 1 \
    --output "$WORK/mmlu-int4-awq"
# a gate: its bf16 baseline produced on the device, int4-awq's run above as the candidate; any
# verdict passes (exit 0-2: PASS, FAIL, INCONCLUSIVE), an error (3) fails
printf '%s\n' "name: device" "model: $MODEL" "tasks: {mmlu: [--num-fewshot, '1', --per-subject, '1']}" \
    "runs_dir: $WORK/gate-runs" "baseline: {recipe: bf16}" "candidates: [{run: $WORK/mmlu-int4-awq}]" \
    "metrics: {mmlu.cloze.acc: 0.5}" >"$WORK/gate.yaml"
step gate bash -c '"$@"; [ $? -le 2 ]' gate $EVALSUITE gate "$WORK/gate.yaml" --device "$DEVICE"
step perplexity "${run[@]}" perplexity --model "$MODEL" --recipe bf16 "${common[@]}" --per-article 1 \
    --output "$WORK/perplexity"
}

lane_c() {  # a quantized checkpoint, written and run
step quantize $EVALSUITE quantize --model "$MODEL" --recipe int4-awq --device "$DEVICE" --output "$WORK/int4-awq-checkpoint"
step mmlu-quantized-checkpoint "${run[@]}" mmlu --model "$WORK/int4-awq-checkpoint" "${common[@]}" --num-fewshot 1 \
    --per-subject 1 --output "$WORK/mmlu-quantized-checkpoint"
}

lane_d() {  # lm-eval (through run and through its own command line), bench, study
if "$PYTHON" -c "import lm_eval.evaluator, lm_eval.tasks" >"$WORK/lm-eval-import.log" 2>&1; then
    step lm-eval-harness "${run[@]}" --harness lm-eval --task evalsuite_mmlu_continuation_anatomy --limit 3 \
        --model "$MODEL" --device "$DEVICE" --output "$WORK/lm-eval-harness"
    step lm-eval $EVALSUITE lm-eval --model evalsuite --model_args "model=$MODEL" --device "$DEVICE" \
        --tasks evalsuite_mmlu_anatomy --limit 2 --output_path "$WORK/lm-eval"
else
    echo "SKIPPED lm-eval-harness, lm-eval: lm-eval does not import here ($(tail -n 1 "$WORK/lm-eval-import.log"))"
    printf '%s\n' lm-eval-harness lm-eval >>"$WORK/skipped-steps"
fi
step bench $EVALSUITE bench --model "$MODEL" --device "$DEVICE" --recipes bf16 fp8-modelopt int4-awq --lengths 64/16 \
    --batches 1 4 --output "$WORK/bench"

step study $EVALSUITE study --model "$MODEL" --recipes fp8-official bf16 --per-subject 1 --per-article 1 \
    --device "$DEVICE" --root "$WORK"
}

lane_e() {  # the server, MMLU over its endpoint, MT-Bench judged through it with the openai client
$EVALSUITE serve --model "$MODEL" --device "$DEVICE" --port "$PORT" --served-model-name random --max-model-len 4096 \
    >"$WORK/serve.log" 2>&1 &
server=$!
for _ in $(seq 120); do
    "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/v1/models', timeout=1)" \
        2>/dev/null && break
    sleep 1
done
step serve-models "$PYTHON" -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$PORT/v1/models').read())"
step mmlu-endpoint "${run[@]}" mmlu --base-url "http://127.0.0.1:$PORT/v1" --model random --tokenizer "$MODEL" \
    --no-progress --num-fewshot 1 --per-subject 1 --output "$WORK/mmlu-endpoint"
step mt-bench "${run[@]}" mt-bench --model "$MODEL" --recipe bf16 "${common[@]}" --questions 4 --max-new-tokens 32 \
    --judge-base-url "http://127.0.0.1:$PORT/v1" --judge-model random --judge-tokenizer "$MODEL" \
    --calibration-questions 2 --output "$WORK/mt-bench"
kill "$server" 2>/dev/null; wait "$server" 2>/dev/null
grep -E "device|cuda|Traceback|Error" "$WORK/serve.log" | head -n 5 | sed 's/^/    serve: /'
}

lane_f() {  # the published forms, exported on the device, then loaded as published and run there
# (Model Optimizer's FP8 through torch._scaled_mm; AutoAWQ's GEMM form through tinygemm)
mo=(--recipe fp8-modelopt --recipe-config quantize_attention=false 'kernel="scaled_mm"')
step export-fp8-modelopt $EVALSUITE quantize --model "$MODEL" "${mo[@]}" --device "$DEVICE" --format hf \
    --output "$WORK/fp8-modelopt-hf"
step mmlu-published-fp8-modelopt "${run[@]}" mmlu --model "$WORK/fp8-modelopt-hf" "${mo[@]}" "${common[@]}" \
    --num-fewshot 1 --per-subject 1 --output "$WORK/mmlu-published-fp8-modelopt"
awq=(--recipe int4-awq-asym --recipe-config block_size=64)
step export-int4-awq-asym $EVALSUITE quantize --model "$MODEL" "${awq[@]}" --device "$DEVICE" --format hf \
    --output "$WORK/int4-awq-asym-hf"
step mmlu-published-int4-awq-asym "${run[@]}" mmlu --model "$WORK/int4-awq-asym-hf" "${awq[@]}" "${common[@]}" \
    --num-fewshot 1 --per-subject 1 --output "$WORK/mmlu-published-int4-awq-asym"
}

lane_g() {  # Model Optimizer's W4A16_AWQ and NVFP4, exported and run as published
# W4A16_AWQ through tinygemm, inputs times pre_quant_scale, FP8 KV cache; NVFP4 simulated
mo_awq=(--recipe int4-awq --recipe-config block_size=64 fp8_kv_cache=true)
step export-int4-awq $EVALSUITE quantize --model "$MODEL" "${mo_awq[@]}" --device "$DEVICE" --format hf \
    --output "$WORK/int4-awq-hf"
step mmlu-published-int4-awq "${run[@]}" mmlu --model "$WORK/int4-awq-hf" "${mo_awq[@]}" "${common[@]}" \
    --num-fewshot 1 --per-subject 1 --output "$WORK/mmlu-published-int4-awq"
step export-nvfp4 $EVALSUITE quantize --model "$MODEL" --recipe nvfp4 --device "$DEVICE" --format hf \
    --output "$WORK/nvfp4-hf"
step mmlu-published-nvfp4 "${run[@]}" mmlu --model "$WORK/nvfp4-hf" --recipe nvfp4 "${common[@]}" \
    --num-fewshot 1 --per-subject 1 --output "$WORK/mmlu-published-nvfp4"
}

lane_h() {  # llm-compressor's W8A8 INT8
# SmoothQuant and GPTQ on the device, products by torch._int_mm on CUDA
step export-int8-w8a8 $EVALSUITE quantize --model "$MODEL" --recipe int8-w8a8 --device "$DEVICE" --format hf \
    --output "$WORK/int8-w8a8-hf"
step mmlu-published-int8-w8a8 "${run[@]}" mmlu --model "$WORK/int8-w8a8-hf" --recipe int8-w8a8 "${common[@]}" \
    --num-fewshot 1 --per-subject 1 --output "$WORK/mmlu-published-int8-w8a8"
}

# LANE_NAMES: which lanes (a short lease: LANE_NAMES="f g" for the published forms only)
lane_names=${LANE_NAMES:-a b c d e f g h}
for lane in $lane_names; do
    case $lane in [a-h]) ;; *) echo "LANE_NAMES=$lane_names: lanes are a b c d e f g h"; exit 2;; esac
done
if [ "$LANES" = parallel ]; then  # a share of the cores each, or their thread pools spin against each other
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(($(nproc) / 8))}
    export OMP_NUM_THREADS=$((OMP_NUM_THREADS > 0 ? OMP_NUM_THREADS : 1))
fi
for lane in $lane_names; do  # each lane's own calibration cache: two processes never write one entry
    if [ "$LANES" = parallel ]; then
        (export EVALSUITE_CACHE=${EVALSUITE_CACHE:-$WORK/cache-$lane}; "lane_$lane") >"$WORK/lane-$lane.log" 2>&1 &
    else
        (export EVALSUITE_CACHE=${EVALSUITE_CACHE:-$WORK/cache-$lane}; "lane_$lane")
    fi
done
if [ "$LANES" = parallel ]; then
    wait
    for lane in $lane_names; do echo "-- lane $lane"; cat "$WORK/lane-$lane.log"; done
fi

[ -s "$WORK/skipped-steps" ] && echo "skipped steps: $(tr '\n' ' ' <"$WORK/skipped-steps")"
if [ -s "$WORK/failed-steps" ]; then
    echo "failed steps: $(tr '\n' ' ' <"$WORK/failed-steps")(logs in $WORK)"
    exit 1
fi
echo "every step that ran ran on $DEVICE (logs in $WORK)"
