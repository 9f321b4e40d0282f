#!/usr/bin/env bash
# The embedded model in three parts for the device machine, because the checkout now ships trained drafters
# (~29 MB) and a checkout plus one of ../shared/device/pack-model's 47 MB halves passes the 64 MiB a call takes.
# Run here, once, after `PYTHON=.venv/bin/python ../shared/device/pack-model`, from the project root:
#   bash scripts/device_model_parts.sh
# It writes the git-ignored folders .carry-model-1, .carry-model-2, .carry-model-3 (~33 MB each). Then, back to back:
#   1. carry .carry-model-1:                   mkdir -p /root/models && cp .carry-model-1/part-1 /root/models/
#   2. carry .carry-model-2:                   cp .carry-model-2/part-2 /root/models/
#   3. carry .carry-model-3 (and .carry-whl):  bash .carry-model-3/assemble && export PYTHONPATH=/tmp/site:$PWD && <command>
set -euo pipefail
[ -f .carry-model-a/part00 ] && [ -f .carry-model-b/part01 ] || { echo "run ../shared/device/pack-model first" >&2; exit 1; }
tmp=$(mktemp -d)
cat .carry-model-a/part00 .carry-model-b/part01 > "$tmp/model.gguf"
size=$(stat -c %s "$tmp/model.gguf")
third=$(( (size + 2) / 3 ))
for i in 1 2 3; do
  mkdir -p ".carry-model-$i"
  grep -qx "/.carry-model-$i/" .git/info/exclude 2>/dev/null || echo "/.carry-model-$i/" >> .git/info/exclude
  dd if="$tmp/model.gguf" of=".carry-model-$i/part-$i" bs="$third" skip=$(( i - 1 )) count=1 status=none
done
cp .carry-model-b/sha256 .carry-model-3/sha256
cat > .carry-model-3/assemble <<'ASSEMBLE'
#!/usr/bin/env bash
# On the device machine, after the calls that copied part-1 and part-2 to /root/models: join, check, install wheels.
set -euo pipefail
for i in 1 2; do [ -f /root/models/part-$i ] || { echo "assemble: /root/models/part-$i is missing: copy it in the calls right before" >&2; exit 1; }; done
cat /root/models/part-1 /root/models/part-2 .carry-model-3/part-3 > /root/models/smollm2.gguf
echo "$(cat .carry-model-3/sha256)  /root/models/smollm2.gguf" | sha256sum -c --quiet
rm -f /root/models/part-1 /root/models/part-2
if ls .carry-whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry-whl/*.whl
fi
echo "assemble: /root/models/smollm2.gguf ready"
ASSEMBLE
chmod +x .carry-model-3/assemble
rm -rf "$tmp"
ls -la .carry-model-1 .carry-model-2 .carry-model-3
