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


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens

    def step(self, state: DetokenizerState, token_ids: list[int]) -> str:
        """Append the text of token_ids' newest tokens to state.text; return the new text."""
        if self.tokenizer is None:
            return ""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
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
