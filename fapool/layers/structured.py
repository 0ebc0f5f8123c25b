"""Structured outputs: a request's output constrained by a JSON schema, a regex, a choice or a
Lark grammar, through llguidance (one of the grammar engines vLLM and SGLang use). Each such
request carries a matcher; before a token is drawn, the matcher's allowed-token bitmask sets
every other logit to -inf (on the logits' device), and the drawn token advances the matcher."""

from __future__ import annotations

import json

import torch

from fapool.sampling_params import StructuredOutputs


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled (a bad schema, regex or grammar)."""


class GrammarCompiler:
    """Matchers for one tokenizer (its llguidance view is built once, on first use)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer = None

    def matcher(self, spec: StructuredOutputs):
        import llguidance
        import llguidance.hf

        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
        matcher_cls = llguidance.LLMatcher
        if spec.json is not None:
            grammar = matcher_cls.grammar_from_json_schema(spec.json)
        elif spec.regex is not None:
            grammar = matcher_cls.grammar_from_regex(spec.regex)
        elif spec.choice is not None:  # JSON string literals are Lark string literals
            grammar = matcher_cls.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
        else:
            grammar = matcher_cls.grammar_from_lark(spec.grammar)
        is_error, messages = matcher_cls.validate_grammar_with_warnings(grammar, self._ll_tokenizer)
        if is_error:
            raise StructuredOutputError(f"invalid structured output constraint: {messages[0]}")
        matcher = matcher_cls(self._ll_tokenizer, grammar)
        if matcher.is_error():
            raise StructuredOutputError(f"invalid structured output constraint: {matcher.get_error()}")
        return matcher


def apply_grammar_masks(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """Set logits[rows[k]] to -inf wherever matchers[k] does not allow the token next (in place):
    the packed bitmasks are filled on the host, copied once and unpacked on the logits' device
    (llguidance's own helper compiles with torch.compile on first use)."""
    import llguidance.torch as llt

    vocab = logits.shape[-1]
    packed = llt.allocate_token_bitmask(len(rows), vocab)
    for k, matcher in enumerate(matchers):
        llt.fill_next_token_bitmask(matcher, packed, k)
    dev = logits.device
    idx = torch.tensor(rows, dtype=torch.long)
    if dev.type == "cuda":  # pinned: a copy from pageable memory would wait for the queued work
        packed, idx = (t.pin_memory().to(dev, non_blocking=True) for t in (packed, idx))
    bits = torch.arange(32, dtype=torch.int32, device=dev)
    allowed = ((packed.unsqueeze(-1) >> bits) & 1).flatten(1)[:, :vocab].bool()
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
