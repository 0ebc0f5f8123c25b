"""Incremental detokenization and stop-string matching.

Decoding the whole output every step is quadratic; like vLLM, we decode a short window
(prefix_offset..end) and emit the new text once it no longer ends in a partial UTF-8
sequence ("\ufffd").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class DetokenizerState:
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""


def backend_decode(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str] | None:
    """The Rust `tokenizers` decode of a transformers fast tokenizer, when the wrapper's decode
    would return exactly its text (no subclass override, no clean-up of tokenization spaces);
    else None. The wrapper costs several times the decode itself, twice per token."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: keep its decode
        return None
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        not isinstance(tokenizer, TokenizersBackend)
        or backend is None
        or cls.decode is not PreTrainedTokenizerBase.decode
        or cls._decode is not TokenizersBackend._decode
        or getattr(tokenizer, "clean_up_tokenization_spaces", True)
    ):
        return None
    skip = bool(skip_special_tokens)
    return lambda ids: backend.decode(ids, skip_special_tokens=skip)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode = None
        if tokenizer is not None:
            self._decode = backend_decode(tokenizer, skip_special_tokens) or (
                lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
            )

    def step(self, state: DetokenizerState, token_ids: list[int]) -> str:
        """Append the text of token_ids' newest tokens to state.text; return the new text."""
        decode = self._decode
        if decode is None:
            return ""
        prefix = decode(token_ids[state.prefix_offset : state.read_offset])
        full = decode(token_ids[state.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            state.prefix_offset = state.read_offset
            state.read_offset = len(token_ids)
            state.text += new
            return new
        return ""


def find_stop(text: str, new_len: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the newest new_len characters: (index, stop)."""
    best = None
    for stop in stops:
        start = max(0, len(text) - new_len - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best
