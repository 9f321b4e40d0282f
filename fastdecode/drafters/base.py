"""The drafter protocol: `Proposal` (what a drafter guesses), `DraftContext` (what it may read),
`StepResult` (what it learns after verification), the method registry and option parsing.

A drafter never writes the target's cache and never decides what is accepted: the verifier does.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fastdecode.sampling import SamplingParams


@dataclass
class Proposal:
    """Draft tokens as a tree in topological order.

    `parents[j]` is the index of node j's parent, or -1 for a child of the pending (last committed) token;
    a parent always comes before its children. `draft_probs[j]` is the distribution node j was drawn from
    (after the target's temperature / top-k / top-p), or `draft_probs is None` for a deterministic drafter.
    Example, a root with two children where the first has a child: tokens=[a, b, c], parents=[-1, 0, -1].

    `extra_*` are lookahead rows (Jacobi branches): scored in the same target forward, their logits go
    back to the drafter, their K/V are never kept. `extra_mask[i, r]` says whether extra row i attends to
    row r of the forward (row 0 = pending, 1..m = draft nodes, m+1.. = extra rows); it always sees the cache.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None  # (m, V) fp32
    draft_forwards: int = 0  # forwards the drafter ran to make this proposal (not steps)
    extra_tokens: list[int] = field(default_factory=list)
    extra_positions: list[int] = field(default_factory=list)  # offsets from the pending token's position
    extra_mask: torch.Tensor | None = None  # (e, 1+m+e) bool

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        d: list[int] = []
        for j, p in enumerate(self.parents):
            if not -1 <= p < j:
                raise ValueError(f"proposal node {j} has parent {p}: parents must come first")
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def clip(self, max_depth: int, max_nodes: int) -> Proposal:
        """Drop nodes deeper than `max_depth` and nodes past the first `max_nodes` (with their subtrees)."""
        depths = self.depths()
        keep: list[int] = []
        new_index: dict[int, int] = {-1: -1}
        for j, p in enumerate(self.parents):
            if len(keep) < max_nodes and depths[j] <= max_depth and p in new_index:
                new_index[j] = len(keep)
                keep.append(j)
        if len(keep) == len(self.tokens):
            return self
        probs = None if self.draft_probs is None else self.draft_probs[keep]
        extra_mask = self.extra_mask
        if extra_mask is not None:  # lookahead rows keep their own columns; dropped nodes' columns go
            m = len(self.tokens)
            cols = [0, *(1 + j for j in keep), *range(1 + m, extra_mask.shape[1])]
            extra_mask = extra_mask[:, cols]
        return Proposal(
            tokens=[self.tokens[j] for j in keep],
            parents=[new_index[self.parents[j]] for j in keep],
            draft_probs=probs,
            draft_forwards=self.draft_forwards,
            extra_tokens=self.extra_tokens,
            extra_positions=self.extra_positions,
            extra_mask=extra_mask,
        )

    @staticmethod
    def chain(tokens: list[int], draft_probs: torch.Tensor | None = None, draft_forwards: int = 0) -> Proposal:
        return Proposal(list(tokens), list(range(-1, len(tokens) - 1)), draft_probs, draft_forwards)


@dataclass
class Verdict:
    """The verifier's decision. `path` indexes proposal nodes from the root down; `tokens` are their
    tokens (the accepted draft tokens); `bonus` is the target's own next token after the path."""

    path: list[int]
    tokens: list[int]
    bonus: int

    @property
    def new_tokens(self) -> list[int]:
        return [*self.tokens, self.bonus]


@dataclass
class DraftContext:
    """What a drafter may read at each step. `tokens` ends with the pending token (not yet in the cache)."""

    tokens: list[int]
    prompt_len: int
    max_depth: int  # deeper nodes would pass the token budget or the context
    max_nodes: int  # more nodes would not fit the KV cache
    params: SamplingParams
    vocab_size: int
    target: Any  # the engine's target runner: drafters that run the target's layers use it (never its cache)


@dataclass
class StepResult:
    """What the drafter learns after a step: the verdict, and the logits of its lookahead rows (if any)."""

    proposal: Proposal
    verdict: Verdict
    extra_logits: torch.Tensor | None  # (e, V) fp32
    step_seconds: float  # drafting + verification of this step, as the engine measured it
    logits: torch.Tensor | None = None  # (1+m, V) fp32: the target's logits for the pending row and the draft rows
    draft_seconds: float = 0.0  # the drafting part of step_seconds
    hidden: torch.Tensor | None = None  # (1+m, D): the target's final hidden states of those rows (read before the next forward)


class Drafter:
    """Base class: subclasses set the class attributes and implement `propose`; `observe` is optional."""

    name: ClassVar[str]
    description: ClassVar[str]
    lossless: ClassVar[bool] = True
    artifact: ClassVar[str] = ""  # the kind of trained artifact it drafts with (models/draft.py: "draft", "eagle"), if any
    features: ClassVar[bool] = False  # True: the engine calls `prefill` with the target's hidden states of the prompt
    Options: ClassVar[type]

    def __init__(self, options: Any):
        self.options = options

    def reset(self, prompt_tokens: list[int]) -> None:
        """Called once per generation, before the first `propose`."""

    def prefill(self, hidden: torch.Tensor) -> None:
        """Drafters with `features = True` only: the target's final hidden states (P-1, D) of the prompt's
        tokens but the last (the pending one), after `reset`. Read them before the first `propose` returns."""

    def propose(self, ctx: DraftContext) -> Proposal:
        raise NotImplementedError

    def observe(self, result: StepResult) -> None:
        """Called after every step with the verdict."""

    def verdict(self, proposal: Proposal, logits: torch.Tensor, choice: list[int], params: SamplingParams) -> Verdict | None:
        """Lossy methods only (`lossless = False`): the step's verdict by the method's own rule, which lives in
        verify.py, from the target's logits (1+m, V) and its own tokens per row (greedy or Gumbel). None, the
        default, leaves the decision to the lossless verifier. The engine never asks a lossless method."""
        return None

    # --- what the engine calls: `propose` / `observe` behind the adaptive draft-length controller.
    # A method whose options have `adaptive=True` lets fastdecode.drafters.adaptive pick the depth and
    # width of each step's draft from its acceptance and step-time statistics (kept across requests).

    def draft_shape(self) -> tuple[int, int]:
        """The deepest draft and the widest tree (nodes per level) this drafter proposes."""
        return int(getattr(self.options, "num_draft", 8)), 1

    def draft(self, ctx: DraftContext) -> Proposal:
        controller = self._controller()
        if controller is None:
            return self.propose(ctx)
        limited = controller.limit(ctx)
        return self.propose(limited).clip(limited.max_depth, limited.max_nodes)

    def learn(self, result: StepResult) -> None:
        controller = self._controller()
        if controller is not None:
            controller.observe(result)
        self.observe(result)

    def _controller(self) -> Any:
        if not getattr(self.options, "adaptive", False):
            return None
        controller = self.__dict__.get("_length_controller")
        if controller is None:
            from fastdecode.drafters.adaptive import LengthController

            depth, width = self.draft_shape()
            controller = self.__dict__["_length_controller"] = LengthController(depth, width)
        return controller


@dataclass(frozen=True)
class NoOptions:
    pass


_REGISTRY: dict[str, type[Drafter]] = {}


def register(cls: type[Drafter]) -> type[Drafter]:
    _REGISTRY[cls.name] = cls
    return cls


def method_names(include_internal: bool = False) -> list[str]:
    return [n for n in _REGISTRY if include_internal or not n.startswith("_")]


def get_method(name: str) -> type[Drafter]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(method_names())}")
    return _REGISTRY[name]


def _convert(value: Any, typ: Any, key: str, method: str) -> Any:
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ in (int, float, str):
            return typ(value)
        if origin is tuple:
            inner = typing.get_args(typ)[0]
            return tuple(inner(v) for v in value.replace(",", " ").split())
    except ValueError:
        pass
    else:
        return value
    raise ValueError(f"option {key}={value!r} of method {method!r} is not a valid {getattr(typ, '__name__', typ)}")


def make_options(cls: type[Drafter], options: dict[str, Any]) -> Any:
    """Build the method's frozen options from keyword arguments or CLI strings; unknown keys are refused."""
    opt_cls = cls.Options
    hints = typing.get_type_hints(opt_cls)
    names = [f.name for f in dataclasses.fields(opt_cls)]
    for key in options:
        if key not in names:
            listed = ", ".join(names) if names else "none"
            raise ValueError(f"unknown option {key!r} for method {cls.name!r} (its options: {listed})")
    values = {k: _convert(v, hints[k], k, cls.name) for k, v in options.items()}
    opts = opt_cls(**values)
    check: Callable[[], None] | None = getattr(opts, "validate", None)
    if check is not None:
        check()
    return opts


def make_drafter(method: str, **options: Any) -> Drafter:
    cls = get_method(method)
    return cls(make_options(cls, options))
