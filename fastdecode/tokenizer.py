"""Tokenizers from the model's own source (a Hugging Face folder, or a GGUF file's vocabulary), chat
templates, end-of-text ids, and streaming detokenization that never splits a multi-byte character.

A GGUF vocabulary takes transformers ~15 s to convert, so the converted tokenizer is kept in the user's
cache folder (`$FASTDECODE_CACHE`, default `~/.cache/fastdecode`) keyed by the file's size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastdecode.models.loader import ModelSource

END_OF_TEXT_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>")


def cache_dir() -> Path:
    return Path(os.environ.get("FASTDECODE_CACHE", Path.home() / ".cache" / "fastdecode"))


def _load_hf_tokenizer(source: ModelSource) -> Any:
    import logging

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if source.kind == "hf":
        try:
            return AutoTokenizer.from_pretrained(str(source.path))
        except Exception as e:
            raise ValueError(f"model folder {source.path}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    st = source.path.stat()
    key = hashlib.sha256(f"{source.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    saved = cache_dir() / "tokenizers" / key
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    try:
        tok = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    except Exception as e:
        raise ValueError(f"model file {source.path}: cannot build its tokenizer ({type(e).__name__}: {e})") from None
    try:
        saved.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(saved))
    except OSError:
        pass  # a read-only home only costs the conversion again next time
    return tok


class Tokenizer:
    def __init__(self, source: ModelSource, extra_eos: Iterable[int] = ()):
        self.hf = _load_hf_tokenizer(source)
        vocab = self.hf.get_vocab()
        eos = {i for i in extra_eos}
        if self.hf.eos_token_id is not None:
            eos.add(int(self.hf.eos_token_id))
        eos.update(vocab[t] for t in END_OF_TEXT_TOKENS if t in vocab)
        if source.kind == "hf":
            gen = source.path / "generation_config.json"
            if gen.is_file():
                ids = json.loads(gen.read_text()).get("eos_token_id")
                eos.update([ids] if isinstance(ids, int) else ids or [])
        self.eos_ids = frozenset(eos)
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))
        self._rust = _plain_rust_decoder(self.hf)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, ending with the assistant's turn opened."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template: pass raw=True (CLI: --raw)")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("each message must be a dict with 'role' and 'content'")
        out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, ids: list[int]) -> str:
        if self._rust is not None:  # what hf.decode returns, without its Python around the call (streaming decodes often)
            return str(self._rust.decode(ids, skip_special_tokens=True))
        return str(self.hf.decode(ids, skip_special_tokens=True))


def _plain_rust_decoder(hf: Any) -> Any:
    """The `tokenizers` object behind a fast tokenizer whose decode is exactly its decode (no clean-up of spaces, no
    subclass decoding its own way), or None."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if not isinstance(hf, TokenizersBackend) or type(hf)._decode is not TokenizersBackend._decode:
        return None
    if type(hf).decode is not TokenizersBackend.decode or getattr(hf, "clean_up_tokenization_spaces", True):
        return None
    return getattr(hf, "_tokenizer", None)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive; a piece never ends inside a multi-byte character.

    It decodes a short window of recent ids and emits what is new, holding back text that ends in the
    replacement character (an incomplete UTF-8 sequence) until the next ids complete it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this are already emitted as text

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        now = self.tok.decode(self.ids[self.prefix :])
        if now.endswith("\ufffd") or len(now) <= len(before) or not now.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read])
        now = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :] if now.startswith(before) else ""
