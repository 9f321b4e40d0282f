"""Where a benchmark row came from: code version, machine, device, dtype, threads, library versions.

Every row carries this record, and `--resume` refuses to mix rows whose records differ: a speedup is a
ratio of two measurements, and both must come from the same code on the same machine. This module only
describes the environment; it never changes it (thread counts are set by the caller).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

import fastdecode


def git_commit() -> str:
    """The commit of the fastdecode checkout, with `+dirty` when tracked files changed; `unknown` outside git.
    $FASTDECODE_COMMIT overrides it, for copies of a checkout whose git metadata is not theirs (the GPU machine's)."""
    if os.environ.get("FASTDECODE_COMMIT"):
        return os.environ["FASTDECODE_COMMIT"]
    root = Path(fastdecode.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))


def provenance(device: torch.device, dtype: torch.dtype, row_invariant: bool | None = None) -> dict[str, str | int]:
    extra: dict[str, str | int] = {} if row_invariant is None else {"row_invariant": "yes" if row_invariant else "no"}
    return extra | {
        "commit": git_commit(),
        "machine": machine_name(device),
        "device": device.type,
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastdecode": fastdecode.__version__,
    }
