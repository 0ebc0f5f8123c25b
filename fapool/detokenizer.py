"""Incremental detokenization and stop-string matching.

Decoding the whole output every step is quadratic; like vLLM, we decode a short window
(prefix_offset..end) and emit the new text once it no longer ends in a partial UTF-8
sequence ("\ufffd").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DetokenizerState:
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""


def backend_of(tokenizer):
    """The Rust `tokenizers` Tokenizer of a transformers fast tokenizer, when the wrapper's
    decode would return exactly its decode's text (no subclass override, no clean-up of
    tokenization spaces); else None. The wrapper costs several times the decode itself, and
    detokenization decodes twice per token."""
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
    return backend


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skip = bool(skip_special_tokens)
        self._backend = backend_of(tokenizer) if tokenizer is not None else None

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, self._skip)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, state: DetokenizerState, token_ids: list[int]) -> str:
        """Append the text of token_ids' newest tokens to state.text; return the new text."""
        if self.tokenizer is None:
            return ""
        po, ro = state.prefix_offset, state.read_offset
        prefix = self._decode(token_ids[po:ro])
        full = self._decode(token_ids[po:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            state.prefix_offset = ro
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
