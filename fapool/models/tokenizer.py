"""Tokenizer loading. Both paths end in a transformers tokenizer, so chat templates and
special tokens behave exactly as in transformers."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Any of these means the folder ships a tokenizer; tokenizer_config.json alone may only name one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def load_hf_tokenizer(folder: str) -> PreTrainedTokenizerBase | None:
    """None when the folder has no tokenizer files (e.g. a weights-only test checkpoint)."""
    if not has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Vocabulary, merges, special tokens and chat template all come from GGUF metadata.
    The fast-tokenizer class directly: AutoTokenizer would first parse the whole file again for
    a model config it does not need (8 of 9 s for the embedded model)."""
    from transformers import PreTrainedTokenizerFast

    folder, name = os.path.split(os.path.abspath(path))
    return PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)
