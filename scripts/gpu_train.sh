#!/usr/bin/env bash
# Make the training data and train the draft model on the device machine; results go to the folder given as $1.
#   scripts/gpu_train.sh OUT [data] [draft] [check]      (default: all three)
# Expects the embedded model at /root/models/smollm2.gguf and the ShareGPT first turns at $SRC (default
# /root/sharegpt.jsonl.gz, made by scripts/sharegpt_first_turns.py; or SRC=sharegpt with the package installed).
#   data:  fastdecode train data  (COUNT, BATCH, DATA_TIMEOUT: a cut-off run keeps its finished shards)
#   draft: fastdecode train draft (TRAIN_SECONDS of training, LAYERS); the artifact goes to OUT/draft
#   check: a short greedy bench of ar, sps and bild with the new draft (13 prompts, 128 tokens)
set -uo pipefail
out=${1:?usage: scripts/gpu_train.sh OUT [stage ...]}
shift
stages=${*:-data draft check}
mkdir -p "$out"
py=${PYTHON:-python3}
model=${MODEL:-/root/models/smollm2.gguf}
data=${DATA:-/root/train-data}
export PYTHONUNBUFFERED=1 FASTDECODE_CACHE=${FASTDECODE_CACHE:-/tmp/fastdecode-cache}
status=0
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv; "$py" -c 'import torch; print(torch.__version__)'; } > "$out/machine.txt" 2>&1
for stage in $stages; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    data)  t0=$(date +%s)
           timeout "${DATA_TIMEOUT:-300}" "$py" -m fastdecode train data --model "$model" --device cuda --out "$data" --source "${SRC:-/root/sharegpt.jsonl.gz}" \
             --count "${COUNT:-6000}" --held-out 200 --batch-size "${BATCH:-128}" --shard-size 500 --no-progress > "$out/data.log" 2>&1 || status=1
           echo "data: $(( $(date +%s) - t0 )) s"; tail -3 "$out/data.log"
           cp "$data/manifest.json" "$out/data-manifest.json" ;;
    draft) t0=$(date +%s)
           "$py" -m fastdecode train draft --model "$model" --device cuda --data "$data" --out "$out/draft" --layers "${LAYERS:-2}" \
             --steps 100000 --time-limit "${TRAIN_SECONDS:-240}" ${TRAIN_ARGS:-} --no-progress > "$out/train.log" 2>&1 || status=1
           echo "draft: $(( $(date +%s) - t0 )) s"; tail -4 "$out/train.log"
           rm -f "$out/draft/checkpoint.pt" ;;  # optimizer state: too big to come back, not part of the artifact
    check) "$py" -m fastdecode bench --model "$model" --device cuda --dtype bf16 --methods "${CHECK_METHODS:-ar,pld,sps,bild}" \
             --opt sps.draft="$out/draft" --opt bild.draft="$out/draft" --per-category 1 --max-turns 1 --max-new-tokens 128 \
             --out "$out/check" --no-progress > "$out/check.log" 2>&1 || status=1
           tail -20 "$out/check.log" ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
exit $status
