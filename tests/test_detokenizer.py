"""Incremental detokenization: the direct `tokenizers` decode gives the text the transformers
wrapper gives, token by token."""

import random

from fapool.detokenizer import DetokenizerState, IncrementalDetokenizer, backend_of
from fapool.models.tokenizer import load_hf_tokenizer


class _Wrapped:
    """Not a transformers tokenizer: the detokenizer must call its decode."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_backend_of_matches_wrapper(tiny_text_model):
    tok = load_hf_tokenizer(tiny_text_model)
    assert backend_of(tok) is not None
    assert backend_of(_Wrapped(tok)) is None
    rng = random.Random(0)
    # Bytes of multi-byte UTF-8 characters cut anywhere, between ASCII.
    text = "".join(rng.choice(["a", " b", "é", "日本", "🙂", "\n"]) for _ in range(200))
    ids = tok.encode(text, add_special_tokens=False)
    ids += [rng.randrange(256) for _ in range(100)]  # and arbitrary bytes
    for skip in (True, False):
        fast, slow = IncrementalDetokenizer(tok, skip), IncrementalDetokenizer(_Wrapped(tok), skip)
        sf, ss = DetokenizerState(), DetokenizerState()
        for n in range(1, len(ids) + 1):
            assert fast.step(sf, ids[:n]) == slow.step(ss, ids[:n])
            assert sf == ss
        assert sf.text.startswith(text)
