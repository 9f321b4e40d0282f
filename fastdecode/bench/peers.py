"""Peer tools, measured in the same run on the same prompt token ids with the same thread count:

- `transformers`: `generate` on the same weights (the GGUF through `gguf_file=`, or the HF folder), greedy
  plain (`transformers`), prompt lookup (`transformers-pld`, `prompt_lookup_num_tokens=10`) and, given an
  assistant model, assisted generation (`transformers-assisted`);
- `llamacpp`: llama-cpp-python on the same GGUF, plain (`llamacpp`) and with `LlamaPromptLookupDecoding`
  (`llamacpp-pld`).

Peers are optional (`pip install fastdecode[peers]`): one that is not installed, or fails to load, is
skipped with a one-line notice and the run goes on. A peer's clock is the wall time of its own generate
call, prefill included, the device synchronised. Peers never see our engine, and our methods never see them.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdecode.bench.runner import Notify, Peer, Turn
from fastdecode.models.loader import ModelSource, resolve

PEER_TOOLS: dict[str, tuple[str, ...]] = {  # peer -> the modules it needs
    "transformers": ("transformers", "accelerate", "gguf"),
    "llamacpp": ("llama_cpp",),
}
PROMPT_LOOKUP_TOKENS = 10  # transformers' prompt_lookup_num_tokens and llama.cpp's num_pred_tokens
PEERS_HINT = "pip install fastdecode[peers]"


@dataclass(frozen=True)
class PeerSetup:
    """What every peer must share with our run."""

    source: ModelSource  # the target's weights
    dtype: torch.dtype
    device: torch.device
    threads: int
    eos_ids: frozenset[int]
    context: int
    assistant: Path | None = None  # transformers assisted generation


def check_peer_names(names: Sequence[str]) -> None:
    for name in names:
        if name not in PEER_TOOLS:
            raise ValueError(f"unknown peer {name!r}: choose from {', '.join(PEER_TOOLS)}")


def missing_modules(name: str) -> list[str]:
    return [m for m in PEER_TOOLS[name] if importlib.util.find_spec(m) is None]


def make_peers(names: Sequence[str], setup: PeerSetup, notify: Notify) -> list[Peer]:
    """The peer runners for `names`; a missing or broken tool is a notice, never an error."""
    check_peer_names(names)
    builders: dict[str, Callable[[PeerSetup], list[Peer]]] = {"transformers": transformers_peers, "llamacpp": llamacpp_peers}
    peers: list[Peer] = []
    for name in names:
        missing = missing_modules(name)
        if missing:
            notify(f"peer {name} skipped: {', '.join(missing)} not installed ({PEERS_HINT})")
            continue
        try:
            peers += builders[name](setup)
        except Exception as e:  # a peer that cannot load must not end the benchmark
            notify(f"peer {name} skipped: {type(e).__name__}: {e}")
    return peers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finish(token_ids: Sequence[int], eos_ids: frozenset[int]) -> str:
    return "stop" if token_ids and token_ids[-1] in eos_ids else "length"


# ---------------------------------------------------------------- transformers


def load_transformers_model(source: ModelSource, dtype: torch.dtype, device: torch.device) -> Any:
    model: Any
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the de-quantization bar would bury the benchmark's own
    if source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    return model.to(device).eval()


class TransformersPeer:
    def __init__(self, label: str, model: Any, setup: PeerSetup, extra: dict[str, Any]):
        self.label, self.model, self.setup, self.extra = label, model, setup, extra

    def complete(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Turn:
        from transformers import GenerationConfig

        eos = sorted(self.setup.eos_ids)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=None,
            top_p=None,
            eos_token_id=eos,
            pad_token_id=eos[0] if eos else None,
        )
        dev = self.setup.device
        ids = torch.tensor([prompt_ids], device=dev)  # (1, T)
        torch.manual_seed(seed)
        _sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, **self.extra)
        _sync(dev)
        wall = time.perf_counter() - t0
        new = [int(t) for t in out[0, len(prompt_ids) :].tolist()]
        return Turn(tuple(prompt_ids), tuple(new), wall, finish_reason=_finish(new, self.setup.eos_ids))


def draft_as_transformers(folder: Path, target: Any) -> Any:
    """A fastdecode draft artifact as a transformers model for assisted generation: the target's config with
    the draft's layer count, the draft's layers and norm, the target's embedding and (tied) LM head."""
    import copy

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fastdecode.models.draft import WEIGHTS, read_manifest

    manifest = read_manifest(folder)
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = int(manifest["num_layers"])
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    model = AutoModelForCausalLM.from_config(cfg, dtype=target.dtype)
    state = {f"model.{k}": v for k, v in load_file(str(folder / WEIGHTS)).items()}
    state["model.embed_tokens.weight"] = target.get_input_embeddings().weight.detach()
    state["lm_head.weight"] = target.get_output_embeddings().weight.detach()
    missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if "rotary" not in k]
    if missing:
        raise ValueError(f"draft model {folder}: no weight for {missing[0]} of the transformers model")
    return model.to(device=target.device, dtype=target.dtype).eval()


def transformers_peers(setup: PeerSetup) -> list[Peer]:
    model = load_transformers_model(setup.source, setup.dtype, setup.device)
    peers: list[Peer] = [
        TransformersPeer("transformers", model, setup, {}),
        TransformersPeer("transformers-pld", model, setup, {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS}),
    ]
    if setup.assistant is not None:
        if (setup.assistant / "manifest.json").is_file() and not (setup.assistant / "config.json").is_file():
            assistant = draft_as_transformers(setup.assistant, model)  # one of our draft models (fastdecode train draft)
        else:
            assistant = load_transformers_model(resolve(str(setup.assistant)), setup.dtype, setup.device)
        peers.append(TransformersPeer("transformers-assisted", model, setup, {"assistant_model": assistant}))
    return peers


# ---------------------------------------------------------------- llama.cpp


class LlamaCppPeer:
    def __init__(self, label: str, llm: Any, setup: PeerSetup):
        self.label, self.llm, self.setup = label, llm, setup

    def complete(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Turn:
        llm = self.llm
        llm.reset()  # no prefix reuse from the previous prompt: every system pays its own prefill
        llm.set_seed(seed)
        out: list[int] = []
        t0 = time.perf_counter()
        for tok in llm.generate(prompt_ids, temp=temperature, top_k=0 if temperature > 0 else 1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            out.append(int(tok))
            if tok in self.setup.eos_ids or len(out) >= max_new_tokens:
                break
        wall = time.perf_counter() - t0
        return Turn(tuple(prompt_ids), tuple(out), wall, finish_reason=_finish(out, self.setup.eos_ids))


def llamacpp_peers(setup: PeerSetup) -> list[Peer]:
    if setup.source.kind != "gguf":
        raise ValueError("llama.cpp needs a GGUF file; this model is a Hugging Face folder")
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    def load(draft: Any) -> Any:
        return Llama(
            model_path=str(setup.source.path),
            n_ctx=setup.context,
            n_threads=setup.threads,
            n_threads_batch=setup.threads,
            n_gpu_layers=-1 if setup.device.type == "cuda" else 0,
            draft_model=draft,
            verbose=False,
        )

    return [
        LlamaCppPeer("llamacpp", load(None), setup),
        LlamaCppPeer("llamacpp-pld", load(LlamaPromptLookupDecoding(num_pred_tokens=PROMPT_LOOKUP_TOKENS)), setup),
    ]
