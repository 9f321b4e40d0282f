"""Drafters, one per file, registered by name. Importing this package registers them all."""

from fastdecode.drafters import ar, auto, bild, eagle, hydra, layerskip, lookahead, medusa, ngram, pld, rsd, sps, testing  # noqa: F401  (registration)
from fastdecode.drafters.base import (
    DraftContext,
    Drafter,
    Proposal,
    StepResult,
    Verdict,
    get_method,
    make_drafter,
    make_options,
    method_names,
)

__all__ = [
    "DraftContext",
    "Drafter",
    "Proposal",
    "StepResult",
    "Verdict",
    "get_method",
    "make_drafter",
    "make_options",
    "method_names",
]
