#!/usr/bin/env bash
# Make the training data and train the drafters on the device machine.
#   scripts/gpu_train.sh WORK [data] [draft] [eagle] [medusa] [hydra] [check] [bench] [pack OUT]   (default: data draft eagle medusa check)
# Expects the embedded model at /root/models/smollm2.gguf and the ShareGPT first turns at $SRC (default
# /root/sharegpt.jsonl.gz, made by scripts/sharegpt_first_turns.py; or SRC=sharegpt with the package installed).
#   data:  fastdecode train data  (COUNT, BATCH, SHARD, DATA_TIMEOUT: a cut-off run keeps its finished shards)
#   draft: fastdecode train draft (TRAIN_SECONDS of training, LAYERS, TRAIN_ARGS); the artifact goes to WORK/draft
#   eagle: fastdecode train eagle (EAGLE_SECONDS, EAGLE_ARGS); the artifact goes to WORK/eagle
#   medusa: fastdecode train medusa (MEDUSA_SECONDS, MEDUSA_ARGS); the artifact goes to WORK/medusa
#   hydra: fastdecode train hydra (HYDRA_SECONDS, HYDRA_ARGS); the artifact goes to WORK/hydra
#   check: a short greedy bench with the new artifacts (13 prompts, 128 tokens; CHECK_METHODS)
#   bench: the Spec-Bench run of docs/benchmarks.md (PER_CATEGORY prompts a category, 256 tokens; BENCH_METHODS),
#          into WORK/$BENCH_NAME (default bench)
#   profile: scripts/profile_step.py for PROFILE_METHODS (the draft / verify / host split and a cProfile) into WORK/profile
#   pack OUT: the two weight files and one archive of everything else (logs, manifests, plots, bench results) to OUT
set -uo pipefail
work=${1:?usage: scripts/gpu_train.sh WORK [stage ...]}
shift
stages=${*:-data draft eagle medusa check}
mkdir -p "$work"
py=${PYTHON:-python3}
model=${MODEL:-/root/models/smollm2.gguf}
data=${DATA:-/root/train-data}
export PYTHONUNBUFFERED=1 FASTDECODE_CACHE=${FASTDECODE_CACHE:-/tmp/fastdecode-cache}
status=0
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv; "$py" -c 'import torch; print(torch.__version__)'; } > "$work/machine.txt" 2>&1
opts_for() {  # --opt METHOD.draft=... for the listed trained methods whose artifact this run made (else: the shipped one)
  local o="" m k
  for m in sps bild rsd eagle medusa hydra; do
    case $m in sps|bild|rsd) k=draft ;; *) k=$m ;; esac
    case ",$1" in *,$m*) [ -f "$work/$k/draft.safetensors" ] && o="$o --opt $m.draft=$work/$k" ;; esac
  done
  echo "$o"
}
set -- $stages
while [ $# -gt 0 ]; do
  stage=$1; shift
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    data)  t0=$(date +%s)
           timeout "${DATA_TIMEOUT:-300}" "$py" -m fastdecode train data --model "$model" --device cuda --out "$data" --source "${SRC:-/root/sharegpt.jsonl.gz}" \
             --count "${COUNT:-6000}" --held-out 200 --batch-size "${BATCH:-128}" --shard-size "${SHARD:-256}" --no-progress > "$work/data.log" 2>&1 || status=1
           echo "data: $(( $(date +%s) - t0 )) s"; tail -3 "$work/data.log"
           cp "$data/manifest.json" "$work/data-manifest.json" ;;
    draft|eagle|medusa|hydra)
           t0=$(date +%s)
           case $stage in
             draft) secs=${TRAIN_SECONDS:-240}; extra="--layers ${LAYERS:-2} ${TRAIN_ARGS:-}" ;;
             eagle) secs=${EAGLE_SECONDS:-240}; extra=${EAGLE_ARGS:-} ;;
             medusa) secs=${MEDUSA_SECONDS:-180}; extra=${MEDUSA_ARGS:-} ;;
             hydra) secs=${HYDRA_SECONDS:-180}; extra=${HYDRA_ARGS:-} ;;
           esac
           "$py" -m fastdecode train "$stage" --model "$model" --device cuda --data "$data" --out "$work/$stage" $extra \
             --steps 100000 --time-limit "$secs" --no-progress > "$work/train-$stage.log" 2>&1 || status=1
           echo "$stage: $(( $(date +%s) - t0 )) s"; tail -4 "$work/train-$stage.log"
           rm -f "$work/$stage/checkpoint.pt" ;;  # optimizer state: too big to come back, not part of the artifact
    check) m=${CHECK_METHODS:-ar,pld,sps,eagle,medusa}
           "$py" -m fastdecode bench --model "$model" --device cuda --dtype bf16 --methods "$m" $(opts_for "$m") \
             --per-category 1 --max-turns 1 --max-new-tokens 128 --out "$work/check" --no-progress > "$work/check.log" 2>&1 || status=1
           tail -20 "$work/check.log" ;;
    bench) m=${BENCH_METHODS:-ar,pld,sps,sps[lookup=8],bild,eagle,medusa}
           "$py" -m fastdecode bench --model "$model" --device cuda --dtype bf16 --methods "$m" $(opts_for "$m") \
             --per-category "${PER_CATEGORY:-10}" --max-turns 1 --max-new-tokens 256 --out "$work/${BENCH_NAME:-bench}" --no-progress \
             > "$work/${BENCH_NAME:-bench}.log" 2>&1 || status=1
           tail -30 "$work/${BENCH_NAME:-bench}.log" ;;
    profile) m=${PROFILE_METHODS:-ar,pld,sps,eagle,hydra}
           "$py" scripts/profile_step.py --model "$model" --device cuda --dtype bf16 --methods "$m" \
             $(opts_for "$m") --out "$work/profile" > "$work/profile.log" 2>&1 || status=1
           tail -12 "$work/profile.log" ;;
    pack)  out=${1:?pack needs OUT}; shift
           mkdir -p "$out"
           for k in draft eagle medusa hydra; do [ -f "$work/$k/draft.safetensors" ] && cp "$work/$k/draft.safetensors" "$out/$k.safetensors"; done
           tar czf "$out/results.tgz" --exclude='*.safetensors' --exclude='checkpoint.pt' -C "$(dirname "$work")" "$(basename "$work")"
           ls -la "$out" ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
exit $status
