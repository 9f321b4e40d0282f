"""`sps`: speculative sampling with a draft model (Leviathan et al. 2023; Chen et al. 2023).

A small draft model (models/draft.py: a few layers sharing the target's embedding and LM head, trained by
`fastdecode train draft`) drafts a chain autoregressively into a KV cache of its own, which keeps the rows
the verifier accepted (drafters/chain.py). Greedy and the Gumbel sampler verify by matching; the
rejection sampler by speculative sampling with the draft's probabilities: lossless either way. The draft
length adapts to acceptance and step time (`adaptive`). On a GPU the draft's forwards replay CUDA graphs
of their own, as the target's do.

`lookup=N` combines it with prompt lookup: where the last 2-3 tokens occurred before, the draft starts with
up to N tokens of what followed them and the draft model continues from there (one forward feeds them).

`draft=PATH` names the artifact; by default the draft shipped for the embedded model is used when the
target is that model, and any other target needs one (`fastdecode train draft`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdecode.drafters.base import DraftContext, Drafter, Proposal, register
from fastdecode.drafters.chain import ChainState, draft_chain
from fastdecode.drafters.pld import NgramIndex

_LOADED: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()  # target -> {draft folder: draft}


def resolve_draft(target: Any, path: str, kind: str = "draft") -> Path:
    """The artifact to use: `path`, or the shipped artifact of this kind whose target this model is."""
    from fastdecode.models.draft import same_target, shipped

    if path:
        return Path(path).expanduser()
    eager = getattr(target, "eager_model", target)
    for folder, manifest in shipped(kind):
        if same_target(manifest.get("target", {}), eager) is None:
            return folder
    what = {"eagle": "an EAGLE drafter", "medusa": "Medusa heads", "hydra": "Hydra heads"}.get(kind, "a draft model")
    raise ValueError(f"no {what} ships for this target: train one with `fastdecode train {kind}` and pass draft=PATH")


def draft_model(target: Any, path: str, kind: str = "draft") -> Any:
    """The draft model (or EAGLE drafter) for `target`, loaded once per process. A draft model replays CUDA
    graphs of its own where the target does; an EAGLE drafter runs eagerly (its graphs would need feature inputs)."""
    from fastdecode.models.draft import load_draft

    loaded = _LOADED.setdefault(target, {})  # dies with the target: a new model never gets another's draft
    named = f"{kind}:{path}"  # drafters ask every step: the folder is resolved (manifests read, target compared) once
    if named in loaded:
        return loaded[named]
    folder = resolve_draft(target, path, kind)
    key = str(folder.resolve())
    if key not in loaded:  # the same folder named another way shares the loaded model
        model: Any = load_draft(folder, target, kind)
        if kind == "draft" and hasattr(target, "eager_model"):  # the target replays CUDA graphs: so does the draft
            from fastdecode.cuda_graphs import GraphRunner

            model = GraphRunner(model, verbose=getattr(target, "verbose", None))
        loaded[key] = model
    loaded[named] = loaded[key]
    return loaded[key]


@dataclass(frozen=True)
class SpsOptions:
    draft: str = ""  # the draft model's folder (default: the one shipped for the embedded model)
    num_draft: int = 6  # deepest draft
    adaptive: bool = True
    lookup: int = 0  # > 0: start the draft with up to this many tokens of a prompt-lookup match (2-3 token suffix), then the model

    def validate(self) -> None:
        if self.num_draft < 1 or self.lookup < 0:
            raise ValueError("sps: num_draft must be >= 1 and lookup >= 0")
        check_draft(self.draft)


def check_draft(path: str, kind: str = "draft") -> None:
    """A named draft folder that is missing, not an artifact or of another kind fails at option parsing, before any work."""
    if path:
        from fastdecode.models.draft import check_kind, read_manifest

        folder = Path(path).expanduser()
        check_kind(folder, read_manifest(folder), kind)


@register
class SpeculativeSampling(Drafter):
    name = "sps"
    description = "speculative sampling with a trained draft model (fastdecode train draft; one ships for smollm2)"
    lossless = True
    artifact = "draft"
    Options = SpsOptions

    def __init__(self, options: Any):
        super().__init__(options)
        self.state = ChainState()

    def draft_shape(self) -> tuple[int, int]:
        return self.options.num_draft, 1

    def reset(self, prompt_tokens: list[int]) -> None:
        self.state.reset()
        self.index = NgramIndex(2, 3)

    def model(self, ctx: DraftContext) -> Any:
        return draft_model(ctx.target.model, self.options.draft)

    def chain(self, ctx: DraftContext, model: Any, min_confidence: float = 0.0, keep_unconfident: bool = True) -> Proposal:
        k = min(self.options.num_draft, ctx.max_depth, ctx.max_nodes)
        if k < 1:
            return Proposal()
        forced: list[int] = []
        lookup = getattr(self.options, "lookup", 0)  # bild has none
        if lookup and not ctx.params.rejection:
            self.index.update(ctx.tokens)
            found = self.index.continuations(ctx.tokens, min(lookup, ctx.max_depth, ctx.max_nodes), 1)
            forced = found[0] if found else []
        k = min(k, ctx.max_depth - len(forced), ctx.max_nodes - len(forced))
        if k < 1:
            return Proposal.chain(forced)
        # a runner's own cache (its graphs point at it); a plain model's is made to the target cache's size
        maker = getattr(model, "new_target_cache", None)
        new_cache = None if maker is None else (lambda: maker(batch=1, length=ctx.target.cache.max_len))
        return draft_chain(model, self.state, ctx, k, None, min_confidence, keep_unconfident, new_cache, forced)

    def propose(self, ctx: DraftContext) -> Proposal:
        return self.chain(ctx, self.model(ctx))
