"""Draft models: a few Llama layers that share the target's tokenizer, token embedding and LM head.

A draft model is the target's architecture with `num_layers` layers (initialised from some of the
target's) and its own final norm; its embedding and LM head *are* the target's (the same tensors, never
copied), so an artifact holds only its layers and norm: 2 layers of SmolLM2-135M are 14 MB in bf16.

A draft may keep only the most frequent tokens' rows of the LM head (`draft_vocab`, FR-Spec): it then
proposes only those tokens, and its LM head costs a fraction of the target's (on a CPU a full one is a
quarter of a SmolLM2-135M step). Verification is unchanged, so this never affects losslessness.

An artifact is a folder with `draft.safetensors` and `manifest.json` (format, config, the target it was
trained for, the command, data hash, steps, metrics). `load_draft(path, target)` refuses a draft trained
for another target (different shapes or a different embedding) with a one-line error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, cast

import torch

from fastdecode.models.llama import LlamaModel, ModelConfig

FORMAT = "fastdecode-draft/1"
WEIGHTS = "draft.safetensors"
MANIFEST = "manifest.json"
_SHIPPED = Path(__file__).resolve().parent.parent / "drafts"
# shipped with the package
EMBEDDED_DRAFTS = {name: _SHIPPED / name for name in ("smollm2", "smollm2-eagle", "smollm2-medusa", "smollm2-hydra")}
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "rope_theta", "arch")
_SAMPLE = 256  # embedding values recorded to recognise the target


def _embed_sample(model: Any) -> list[float]:
    w = model.embed_tokens.weight.detach()
    rows = torch.linspace(0, w.shape[0] - 1, 16).long().to(w.device)
    return [round(float(v), 4) for v in w[rows, : _SAMPLE // 16].float().flatten().cpu()]


def target_info(model: Any) -> dict[str, Any]:
    """What identifies a target for a draft or a dataset: its shapes and a sample of its embedding
    (dtype-independent: a bf16 and an fp32 load of the same checkpoint give the same record, up to rounding)."""
    cfg = model.cfg
    return {"config": {f: getattr(cfg, f) for f in _SHAPE_FIELDS} | {"num_layers": cfg.num_layers}, "embed_sample": _embed_sample(model)}


def same_target(info: dict[str, Any], model: Any) -> str | None:
    """None when `info` (from `target_info`) describes `model`; else why not, in a few words."""
    cfg = model.cfg
    want = info.get("config", {})
    for f in (*_SHAPE_FIELDS, "num_layers"):
        if want.get(f) != getattr(cfg, f):
            return f"its target has {f}={want.get(f)!r}, this model {getattr(cfg, f)!r}"
    a = torch.tensor(info.get("embed_sample", []), dtype=torch.float32)
    b = torch.tensor(_embed_sample(model), dtype=torch.float32)
    if a.shape != b.shape:
        return "its target's embedding sample is missing"
    scale = float(b.abs().max()) or 1.0
    if float((a - b).abs().max()) > 0.02 * scale:  # bf16 vs fp32 rounding is ~0.4%; another checkpoint is far off
        return "its target has a different token embedding (another checkpoint)"
    return None


def draft_config(target_cfg: ModelConfig, num_layers: int, vocab_size: int | None = None, min_layers: int = 1) -> ModelConfig:
    """The target's config with `num_layers` layers; `vocab_size` is the LM head's rows (a draft vocabulary)."""
    if num_layers < min_layers:
        raise ValueError(f"a draft model needs at least {min_layers} layer, got {num_layers}")
    return dataclasses.replace(target_cfg, num_layers=num_layers, tie_embeddings=True, vocab_size=vocab_size or target_cfg.vocab_size)


def draft_vocabulary(sequences: list[tuple[list[int], int]], size: int) -> torch.Tensor:
    """The `size` most frequent tokens of the answers (ties to the lower id), ascending ids: the rows of the
    target's LM head a draft keeps (FR-Spec). Its LM head then costs size/V of the full one."""
    counts: dict[int, int] = {}
    for ids, plen in sequences:
        for t in ids[plen:]:
            counts[t] = counts.get(t, 0) + 1
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:size]
    return torch.tensor(sorted(ranked), dtype=torch.long)


class FeatureDraft(LlamaModel):
    """An EAGLE drafter (Li et al. 2024): Llama layers over the target's features. Row i's input is
    `fc([f_i ; embed(t_{i+1})])`, the target's final hidden state at position i beside the embedding of the
    token that followed it; its output predicts f_{i+1}, whose LM-head row is the draft's distribution for
    t_{i+2}. Drafting is autoregressive in feature space: a drafted row's output is the next row's f."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        from fastdecode.models.llama import Linear

        self.fc = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        mask: torch.Tensor | None = None,
        num_logits: int | None = None,
        layers: Any = None,
        hidden_only: bool = False,
        key_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        features: torch.Tensor | None = None,  # (B, T, D): the target's feature at each row's position
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if features is None or features.shape[:2] != tokens.shape:
            raise ValueError("an EAGLE draft needs the target's features, a row per token")
        x = self.fc(torch.cat((features.to(self.fc.weight.dtype), self.embed_tokens(tokens).to(self.fc.weight.dtype)), -1))
        return super().forward(tokens, positions, cache, mask, num_logits, layers, hidden_only, key_mask, inputs_embeds=x)


class HeadsDraft(LlamaModel):
    """Draft heads on the target's last hidden state, without layers of their own (Medusa, Hydra): head k is
    `f + SiLU(W_k x + b_k)` through the target's LM head (restricted to the draft vocabulary), W_k starting at
    zero (every head starts as the target's own next-token guess). What x is, is the subclass's."""

    def __init__(self, cfg: ModelConfig, num_heads: int):
        super().__init__(cfg)
        from fastdecode.models.llama import Linear

        D = cfg.hidden_size
        self.heads = torch.nn.ModuleList(Linear(self.head_inputs(k) * D, D, bias=True) for k in range(num_heads))

    @staticmethod
    def head_inputs(k: int) -> int:
        """Vectors of size hidden_size that head k reads."""
        raise NotImplementedError

    def _head(self, k: int, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return features + torch.nn.functional.silu(self.heads[k](x))


class MedusaDraft(HeadsDraft):
    """Medusa heads (Cai et al. 2024): head k maps the target's feature f_i to f_i + SiLU(W_k f_i + b_k), whose
    LM-head row is the draft's distribution for token i+2+k (head 0 guesses the token after the target's own
    next one). One call drafts every depth."""

    @staticmethod
    def head_inputs(k: int) -> int:
        return 1

    def head_hidden(self, features: torch.Tensor) -> torch.Tensor:
        """(K, *features.shape): each head's hidden state for the features (N, D) or (B, T, D)."""
        x = features.to(self.norm.weight.dtype)
        return torch.stack([self._head(k, x, x) for k in range(len(self.heads))])

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(K, ..., V') fp32 logits of every head over the draft vocabulary."""
        return self.lm_head(self.head_hidden(features)).float()


class HydraDraft(HeadsDraft):
    """Hydra heads (Ankner et al. 2024): sequentially dependent Medusa heads. Head k reads the target's feature
    f_i and the embeddings of the k+1 tokens after position i (the target's own next token t_{i+1} and the k
    drafted after it), x = [f_i ; e(t_{i+1}) ; ... ; e(t_{i+1+k})], and guesses t_{i+2+k}. A tree is drafted
    level by level: head d runs once over the nodes of level d it expands, each with its own path."""

    @staticmethod
    def head_inputs(k: int) -> int:
        return k + 2

    def head_hidden(self, k: int, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Head k's hidden state (..., D) for features (..., D) and the tokens after them (..., k+1)."""
        if tokens.shape[-1] != k + 1:
            raise ValueError(f"hydra head {k} reads {k + 1} tokens, got {tokens.shape[-1]}")
        f = features.to(self.norm.weight.dtype)
        e = self.embed_tokens(tokens).to(f.dtype)  # (..., k+1, D)
        return self._head(k, f, torch.cat((f[..., None, :], e), -2).flatten(-2))

    def head_logits(self, k: int, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(..., V') fp32 logits of head k over the draft vocabulary."""
        return self.lm_head(self.head_hidden(k, features, tokens)).float()


# the manifest's "kind": what the weights are
KINDS: dict[str, type[LlamaModel]] = {"draft": LlamaModel, "eagle": FeatureDraft, "medusa": MedusaDraft, "hydra": HydraDraft}


def _share_target(draft: LlamaModel, target: Any, vocab: torch.Tensor | None = None) -> LlamaModel:
    """Point the draft's embedding, LM head and RoPE tables at the target's (frozen, never copied). With a draft
    vocabulary the LM head is the target's rows for those tokens (a copy of size len(vocab) x hidden), and
    `draft.draft_vocab` maps its logit columns to token ids."""
    draft.embed_tokens = target.embed_tokens
    draft.rope_cos, draft.rope_sin = target.rope_cos, target.rope_sin  # the same theta, head size and context
    if vocab is None:
        draft.lm_head = target.lm_head
    else:
        from fastdecode.models.llama import Linear

        head = Linear(target.cfg.hidden_size, len(vocab), bias=False, device="meta")
        head.weight = torch.nn.Parameter(target.lm_head.weight.detach()[vocab.to(target.device)].clone(), requires_grad=False)
        draft.lm_head = head
    draft.draft_vocab = None if vocab is None else vocab.to(target.device)
    draft.draft_vocab_ids = None if vocab is None else vocab.tolist()  # the same on the host: no device read per token
    for p in (draft.embed_tokens.weight, draft.lm_head.weight):
        p.requires_grad_(False)
    return draft


def init_draft(target: Any, layers: list[int], dtype: torch.dtype = torch.float32) -> LlamaModel:
    """A trainable draft model: copies of the target's `layers` (in that order) and final norm, in `dtype`;
    the embedding and LM head are the target's."""
    target = getattr(target, "eager_model", target)
    L = target.cfg.num_layers
    if not layers or any(not 0 <= li < L for li in layers):
        raise ValueError(f"init layers must be indices of the target's {L} layers, got {layers}")
    cfg = draft_config(target.cfg, len(layers))
    with torch.device("meta"):
        draft = LlamaModel(cfg)
    state = {}
    for i, li in enumerate(layers):
        for name, t in target.layers[li].state_dict().items():
            state[f"layers.{i}.{name}"] = t.detach().to(dtype=dtype).clone()
    state["norm.weight"] = target.norm.weight.detach().to(dtype=dtype).clone()
    draft.load_state_dict(state, strict=False, assign=True)
    draft = _share_target(draft, target)
    return draft.to(target.device)


def init_eagle(target: Any, layers: list[int], dtype: torch.dtype = torch.float32) -> FeatureDraft:
    """A trainable EAGLE drafter: copies of the target's `layers` and final norm, and an `fc` that starts by
    passing the token embedding through (its feature half zero): at step 0 it is a draft model on the
    embeddings, and training teaches it to read the features."""
    plain = init_draft(target, layers, dtype)
    with torch.device("meta"):
        draft = FeatureDraft(plain.cfg)
    D = plain.cfg.hidden_size
    state = {k: v for k, v in plain.state_dict().items() if k.startswith(("layers.", "norm."))}
    fc_w = torch.zeros(D, 2 * D, dtype=dtype, device=plain.device)
    fc_w[:, D:] = torch.eye(D, dtype=dtype, device=plain.device)
    state |= {"fc.weight": fc_w, "fc.bias": torch.zeros(D, dtype=dtype, device=plain.device)}
    draft.load_state_dict(state, strict=False, assign=True)
    _share_target(draft, getattr(target, "eager_model", target))
    return draft.to(plain.device)


def init_heads(target: Any, kind: str, num_heads: int, dtype: torch.dtype = torch.float32) -> HeadsDraft:
    """Trainable Medusa or Hydra heads (`kind`) for `target`, each starting as the identity (W_k = 0)."""
    target = getattr(target, "eager_model", target)
    if kind not in ("medusa", "hydra"):
        raise ValueError(f"heads are of kind medusa or hydra, not {kind!r}")
    if num_heads < 1:
        raise ValueError(f"{kind} needs at least 1 head, got {num_heads}")
    cls = cast(type[HeadsDraft], KINDS[kind])
    cfg = draft_config(target.cfg, 0, min_layers=0)
    with torch.device("meta"):
        draft = cls(cfg, num_heads)
    D = cfg.hidden_size
    state = {"norm.weight": target.norm.weight.detach().to(dtype=dtype).clone()}
    for k in range(num_heads):
        state[f"heads.{k}.weight"] = torch.zeros(D, cls.head_inputs(k) * D, dtype=dtype, device=target.device)
        state[f"heads.{k}.bias"] = torch.zeros(D, dtype=dtype, device=target.device)
    draft.load_state_dict(state, strict=False, assign=True)
    _share_target(draft, target)
    return draft.to(target.device)


def init_medusa(target: Any, num_heads: int, dtype: torch.dtype = torch.float32) -> MedusaDraft:
    """Trainable Medusa heads for `target`, each starting as the identity (W_k = 0)."""
    return cast(MedusaDraft, init_heads(target, "medusa", num_heads, dtype))


def trainable_state(draft: LlamaModel) -> dict[str, torch.Tensor]:
    """The draft's own weights (layers, final norm, an EAGLE drafter's fc, Medusa heads), without the
    target's shared embedding and LM head."""
    return {k: v for k, v in draft.state_dict().items() if k.startswith(("layers.", "norm.", "fc.", "heads."))}


def save_draft(
    draft: LlamaModel, out: Path, manifest: dict[str, Any], dtype: torch.dtype = torch.bfloat16, vocab: torch.Tensor | None = None,
) -> Path:
    """Write the artifact folder: the draft's own weights in `dtype`, its vocabulary if it has one (token ids,
    `draft_vocab`), and the manifest (format and config added)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype=dtype, device="cpu").contiguous() for k, v in trainable_state(draft).items()}
    if vocab is not None:
        state["draft_vocab"] = vocab.to(device="cpu", dtype=torch.long).contiguous()
        manifest = {**manifest, "draft_vocab": len(vocab)}
    save_file(state, str(out / WEIGHTS))
    kind = next(k for k, cls in KINDS.items() if type(draft) is cls)
    manifest = {"format": FORMAT, "kind": kind, "num_layers": draft.cfg.num_layers, **manifest}
    if isinstance(draft, HeadsDraft):
        manifest["num_heads"] = len(draft.heads)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"draft model {path} does not exist (a folder with {WEIGHTS} and {MANIFEST})")
    for f in (WEIGHTS, MANIFEST):
        if not (path / f).is_file():
            raise FileNotFoundError(f"draft model folder {path} has no {f}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except ValueError as e:
        raise ValueError(f"draft model {path}: {MANIFEST} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"draft model {path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("kind", "draft") not in KINDS:
        raise ValueError(f"draft model {path}: kind {manifest.get('kind')!r}, expected one of {', '.join(KINDS)}")
    return manifest


def shipped(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    """The artifacts of this kind that ship with the package, with their manifests."""
    out = []
    for folder in EMBEDDED_DRAFTS.values():
        if (folder / WEIGHTS).is_file():
            manifest = read_manifest(folder)
            if manifest.get("kind", "draft") == kind:
                out.append((folder, manifest))
    return out


def check_kind(path: Path, manifest: dict[str, Any], kind: str) -> None:
    """A method's artifact must be of its kind: `sps` takes a draft model, `eagle` an EAGLE drafter."""
    have = manifest.get("kind", "draft")
    if have != kind:
        made = f"fastdecode train {kind}"
        raise ValueError(f"{path} is a {have!r} artifact, this method needs a {kind!r} one ({made})")


def load_draft(path: str | Path, target: Any, kind: str = "draft") -> LlamaModel:
    """The draft model (or, with kind="eagle", the EAGLE drafter) at `path` on the target's device and
    dtype, sharing its embedding and LM head."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    manifest = read_manifest(path)
    check_kind(path, manifest, kind)
    eager = getattr(target, "eager_model", target)
    why = same_target(manifest.get("target", {}), eager)
    if why is not None:
        raise ValueError(f"draft model {path} was trained for another target: {why}")
    try:
        state = load_file(str(path / WEIGHTS))
    except Exception as e:
        raise ValueError(f"draft model {path}: {WEIGHTS} is not a valid safetensors file ({e})") from None
    vocab = state.pop("draft_vocab", None)
    if vocab is not None and (vocab.dim() != 1 or not len(vocab) or int(vocab.min()) < 0 or int(vocab.max()) >= eager.cfg.vocab_size):
        raise ValueError(f"draft model {path}: its draft_vocab is not a list of the target's token ids")
    cls = KINDS[kind]
    heads = issubclass(cls, HeadsDraft)
    cfg = draft_config(eager.cfg, int(manifest["num_layers"]), None if vocab is None else len(vocab), min_layers=int(not heads))
    if heads and int(manifest.get("num_heads", 0)) < 1:
        raise ValueError(f"draft model {path}: its manifest gives no num_heads")
    with torch.device("meta"):
        draft = cast(type[HeadsDraft], cls)(cfg, int(manifest["num_heads"])) if heads else cls(cfg)
    state = {k: v.to(device=eager.device, dtype=eager.dtype) for k, v in state.items()}
    missing = draft.load_state_dict(state, strict=False, assign=True).missing_keys
    missing = [k for k in missing if not k.startswith(("embed_tokens.", "lm_head."))]
    if missing:
        raise ValueError(f"draft model {path}: {WEIGHTS} lacks {len(missing)} weights, e.g. {missing[0]}")
    draft = _share_target(draft, eager, vocab).eval()
    if eager.device.type == "cpu":
        draft.fuse_projections()
    return draft
