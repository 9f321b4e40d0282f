#!/usr/bin/env bash
# The server's load test on the device machine (issue 13): `fastdecode serve` on the GPU, then
# `fastdecode bench --endpoint` at 1 stream (`ar`, the reference answers) and at CONCURRENCY streams for DURATION
# seconds per method in LOAD_METHODS (METHOD or METHOD:SECONDS), each answer compared with the batch-1 reference; /metrics after each.
#   scripts/gpu_serve_load.sh OUT
# Env: MODEL (default /root/models/smollm2.gguf), WORKLOAD (a .jsonl of chat prompts; default the bench's sharegpt
# sample), MAX_NEW (64), CONCURRENCY (64), DURATION (120), LOAD_METHODS ("pld ar"), MAX_BATCH (64), PORT (8765),
# SERVE_ARGS (more `fastdecode serve` flags). Needs the serve extra (fastapi, uvicorn, prometheus-client) and httpx.
set -uo pipefail
out=${1:?usage: scripts/gpu_serve_load.sh OUT}
mkdir -p "$out"
py=${PYTHON:-python3}
model=${MODEL:-/root/models/smollm2.gguf}
workload=${WORKLOAD:-sharegpt}
port=${PORT:-8765}
url="http://127.0.0.1:$port"
export PYTHONUNBUFFERED=1 FASTDECODE_CACHE=${FASTDECODE_CACHE:-/tmp/fastdecode-cache}
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv; "$py" -c 'import torch; print(torch.__version__)'; } > "$out/machine.txt" 2>&1
t0=$(date +%s)
"$py" -m fastdecode serve --model "$model" --device cuda --dtype bf16 --port "$port" --max-batch "${MAX_BATCH:-64}" ${SERVE_ARGS:-} \
  > "$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
trap 'exit 143' TERM INT  # under `timeout`: the EXIT trap stops the server too
health() { "$py" -c "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('$url/health', timeout=2).status == 200 else 1)" 2>/dev/null; }
until health; do
  if ! kill -0 $server 2>/dev/null; then echo "the server exited"; tail -20 "$out/serve.log"; exit 1; fi
  if [ $(( $(date +%s) - t0 )) -gt 300 ]; then echo "the server did not come up in 300 s"; tail -20 "$out/serve.log"; exit 1; fi
  sleep 1
done
echo "server up in $(( $(date +%s) - t0 )) s"
metrics() { "$py" -c "import urllib.request; print(urllib.request.urlopen('$url/metrics').read().decode())" > "$out/metrics-$1.txt"; }
bench() {  # NAME CONCURRENCY METHOD [more flags]
  local name=$1 conc=$2 method=$3; shift 3
  "$py" -m fastdecode bench --endpoint "$url" --workload "$workload" --per-category 48 --max-new-tokens "${MAX_NEW:-64}" \
    --concurrency "$conc" --endpoint-method "$method" --out "$out/$name" "$@" 2>&1 | tail -3 | tee "$out/$name.log"
  metrics "$name"
}
bench warmup "${CONCURRENCY:-64}" pld --duration 15 > /dev/null  # the batched forwards' graphs and kernels (every bucket), before anything is timed
bench b1-ar 1 ar
for entry in ${LOAD_METHODS:-pld ar}; do  # METHOD or METHOD:SECONDS
  method=${entry%%:*}; seconds=${DURATION:-120}; [ "$entry" != "$method" ] && seconds=${entry#*:}
  bench "c${CONCURRENCY:-64}-$method" "${CONCURRENCY:-64}" "$method" --duration "$seconds" --reference "$out/b1-ar/answers.jsonl"
done
