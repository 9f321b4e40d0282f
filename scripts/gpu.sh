#!/usr/bin/env bash
# Run the GPU tests and the GPU benchmark on the device machine; results go to the folder given as $1.
#   scripts/gpu.sh OUT [tests] [sweep] [forward] [bench] [fbench] [firstrun]     (default: tests forward bench)
# Expects the embedded model at /root/models/smollm2.gguf (see ../shared/device/README.md) for `bench`,
# and PYTHONPATH holding the checkout (and /tmp/site for the gguf package).
# `sweep` tunes the fused linear kernels and writes $TUNING_OUT (default /root/tuning.json); stages after it,
# and every stage when TUNING names a file, run with FASTDECODE_TUNING set to that file.
set -uo pipefail
out=${1:?usage: scripts/gpu.sh OUT [stage ...]}
shift
stages=${*:-tests forward bench}
mkdir -p "$out"
py=${PYTHON:-python3}
model=${MODEL:-/root/models/smollm2.gguf}
export PYTHONUNBUFFERED=1 FASTDECODE_CACHE=${FASTDECODE_CACHE:-/tmp/fastdecode-cache}
status=0
if [ -n "${TUNING:-}" ]; then export FASTDECODE_TUNING=$TUNING; fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; "$py" -c 'import torch; print(torch.__version__)'; } > "$out/machine.txt" 2>&1
for stage in $stages; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    tests)   "$py" -m pytest -q -x tests/test_gpu.py 2>&1 | tee "$out/tests.log" || status=1 ;;
    sweep)   tuning_out=${TUNING_OUT:-/root/tuning.json}
             "$py" scripts/gpu_kernel_sweep.py --out "$out/sweep.json" --tuning-out "$tuning_out" ${SWEEP_ARGS:-} 2>"$out/sweep.log" || status=1
             tail -8 "$out/sweep.log"
             if [ -f "$tuning_out" ]; then export FASTDECODE_TUNING=$tuning_out; cp "$tuning_out" "$out/tuning.json"; fi ;;
    forward) "$py" scripts/gpu_forward_timing.py --out "$out/forward.json" ${FORWARD_ARGS:-} 2>"$out/forward.log" || status=1 ;;
    bench)   "$py" scripts/gpu_bench.py --model "$model" --out "$out/bench.json" ${BENCH_ARGS:-} 2>"$out/bench.log" || status=1 ;;
    fbench)  # METHODS, DTYPE, WORKLOAD, PER_CATEGORY, TEMPERATURE, FB_NAME, FB_TIMEOUT, FB_ARGS (more bench flags);
             # RESUME_FROM: a results folder of an earlier command
             fb="$out/${FB_NAME:-fbench}"; mkdir -p "$fb"
             if [ -n "${RESUME_FROM:-}" ] && [ -f "$RESUME_FROM/results.jsonl" ]; then cp "$RESUME_FROM/results.jsonl" "$fb/"; fi
             timeout "${FB_TIMEOUT:-540}" "$py" -m fastdecode bench --model "$model" --device cuda --dtype "${DTYPE:-bf16}" \
               --methods "${METHODS:-ar,pld}" --workload "${WORKLOAD:-spec-bench}" --per-category "${PER_CATEGORY:-10}" --max-new-tokens 256 --out "$fb" --resume \
               --temperature "${TEMPERATURE:-0}" --no-progress ${FB_ARGS:-} > "$fb.log" 2>&1 || status=1
             tail -40 "$fb.log" ;;
    firstrun) # one-off CLI runs as a user meets them: fresh caches, then warm ones, with and without torch.compile;
             # each line: the process's wall time, then the CLI's summary line (its decode time and capture)
             for compile in 0 1; do
               cache="/tmp/fd-firstrun-$compile"; rm -rf "$cache"
               for run in cold warm warm2; do
                 t0=$(date +%s%N)
                 FASTDECODE_CACHE=$cache FASTDECODE_COMPILE=$compile "$py" -m fastdecode generate --model "$model" --method ${FR_METHOD:-pld} \
                   --max-new-tokens 128 "Summarize the plot of Hamlet in three sentences." > "$out/firstrun.txt" 2> "$out/firstrun.err" || status=1
                 t1=$(date +%s%N)
                 echo "compile=$compile $run: process $(( (t1 - t0) / 1000000 )) ms; $(tail -1 "$out/firstrun.err")" | tee -a "$out/firstrun.log"
               done
             done
             head -c 300 "$out/firstrun.txt"; echo ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
exit $status
