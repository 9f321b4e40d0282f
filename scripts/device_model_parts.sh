#!/usr/bin/env bash
# The embedded model in PARTS parts (default 5) for the device machine, because the checkout ships trained
# drafters (~38 MB) and a checkout plus one of ../shared/device/pack-model's 47 MB halves passes the 64 MiB a
# call takes. Run here, once, after `PYTHON=.venv/bin/python ../shared/device/pack-model`, from the project root:
#   PARTS=5 bash scripts/device_model_parts.sh
# It writes the git-ignored folders .carry-model-1 … .carry-model-N (~20 MB each with 5). Then, back to back:
#   calls 1 … N-1, carrying .carry-model-I:      mkdir -p /root/models && cp .carry-model-I/part-I /root/models/
#   call N, carrying .carry-model-N (and .carry-whl):  bash .carry-model-N/assemble && export PYTHONPATH=/tmp/site:$PWD && <command>
# Keep each call's carry plus the checkout under 64 MiB (the ShareGPT turns, 4.4 MB, fit beside any part).
set -euo pipefail
n=${PARTS:-5}
[ "$n" -ge 2 ] || { echo "PARTS must be >= 2" >&2; exit 1; }
[ -f .carry-model-a/part00 ] && [ -f .carry-model-b/part01 ] || { echo "run ../shared/device/pack-model first" >&2; exit 1; }
tmp=$(mktemp -d)
cat .carry-model-a/part00 .carry-model-b/part01 > "$tmp/model.gguf"
size=$(stat -c %s "$tmp/model.gguf")
chunk=$(( (size + n - 1) / n ))
rm -rf .carry-model-[0-9]*
for i in $(seq 1 "$n"); do
  mkdir -p ".carry-model-$i"
  grep -qx "/.carry-model-$i/" .git/info/exclude 2>/dev/null || echo "/.carry-model-$i/" >> .git/info/exclude
  dd if="$tmp/model.gguf" of=".carry-model-$i/part-$i" bs="$chunk" skip=$(( i - 1 )) count=1 status=none
done
last=".carry-model-$n"
cp .carry-model-b/sha256 "$last/sha256"
cat > "$last/assemble" <<ASSEMBLE
#!/usr/bin/env bash
# On the device machine, after the calls that copied part-1 … part-$(( n - 1 )) to /root/models: join, check, install wheels.
set -euo pipefail
here=\$(dirname "\$0")
parts=()
for i in \$(seq 1 $(( n - 1 ))); do
  [ -f /root/models/part-\$i ] || { echo "assemble: /root/models/part-\$i is missing: copy it in the calls right before" >&2; exit 1; }
  parts+=(/root/models/part-\$i)
done
cat "\${parts[@]}" "\$here/part-$n" > /root/models/smollm2.gguf
echo "\$(cat "\$here/sha256")  /root/models/smollm2.gguf" | sha256sum -c --quiet
rm -f "\${parts[@]}"
if ls .carry-whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry-whl/*.whl
fi
echo "assemble: /root/models/smollm2.gguf ready"
ASSEMBLE
chmod +x "$last/assemble"
rm -rf "$tmp"
ls -la .carry-model-*
