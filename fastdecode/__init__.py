"""fastdecode: several tokens per forward pass — speculative and parallel decoding, measured."""

from fastdecode.api import Generation, Generator, Stream, load
from fastdecode.engine import GenerationStats

__all__ = ["Generation", "GenerationStats", "Generator", "Stream", "load"]
__version__ = "0.1.0"
