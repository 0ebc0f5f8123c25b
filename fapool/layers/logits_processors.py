"""Per-request edits of the logits before sampling, with vLLM's meanings:

    repetition_penalty   tokens seen in the prompt or output: positive logits / p, negative * p
    presence_penalty     minus p for every token the output already holds (OpenAI)
    frequency_penalty    minus p times the token's count in the output (OpenAI)
    logit_bias           plus the given bias per token id
    min_tokens           end-of-sequence and stop tokens masked until that many tokens exist
    bad_words            a word's last token masked where the output ends with its other tokens
    allowed_token_ids    every other token masked
    structured_outputs   tokens the request's grammar does not allow next masked (llguidance)

Each kind is one batched pass over the rows that use it, whatever their number. The penalties
read per-request state kept on the logits' device (output-token counts, the prompt's tokens),
updated with only the tokens added since the last step, so a step's host work does not grow
with the length of the prompts and outputs.

They need each request's token history up to its last token, so under async scheduling a step
with such a request launches in halves (LLMEngine._launch): the forward pass, the previous step's
tokens processed on the host meanwhile, then these edits of the due rows on the device and the
draw, without waiting for the device. Executors that cannot split a launch step synchronously.
"""

from __future__ import annotations

import torch

from fapool.layers.structured import apply_grammar_masks
from fapool.request import Request


def needs_processing(req: Request) -> bool:
    return req.params.has_logits_processing


class LogitsEditor:
    """The edits above for one engine (one vocabulary, one device). Penalised requests hold a
    slot in `counts` (output tokens per id) and `prompt_seen` until they finish."""

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab = vocab_size
        self.device = torch.device(device)
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=self.device)
        self.prompt_seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=self.device)
        self._slots: dict[str, tuple[Request, int, int]] = {}  # request id -> (request, slot, tokens counted)
        self._free: list[int] = []

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        return t.to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        """Edit logits [N, V] in place, row i for reqs[i]. Rows of requests without any edit, or
        already finished (async scheduling: a row drawn blind, whose token is dropped), are untouched."""
        rows = [(i, r) for i, r in enumerate(reqs) if needs_processing(r) and not r.finished]
        if not rows:
            return
        self._penalties(logits, [(i, r) for i, r in rows if _penalised(r.params)])
        bias: list[tuple[int, int, float]] = []
        masked: list[tuple[int, int]] = []
        allowed: list[tuple[int, list[int]]] = []
        grammar: list[tuple[int, object]] = []
        for i, req in rows:
            p = req.params
            bias += [(i, t, b) for t, b in p.logit_bias]
            if len(req.output_token_ids) < p.min_tokens:
                stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(req.eos_token_ids))
                masked += [(i, t) for t in stops]
            for word in req.bad_words_token_ids:
                if len(word) == 1 or req.output_token_ids[-(len(word) - 1) :] == word[:-1]:
                    masked.append((i, word[-1]))
            if p.allowed_token_ids:
                allowed.append((i, list(p.allowed_token_ids)))
            if req.matcher is not None:
                grammar.append((i, req.matcher))
        if bias:
            r, t, b = zip(*bias)
            logits.index_put_((self._tensor(r), self._tensor(t)), self._tensor(b, logits.dtype), accumulate=True)
        if masked:
            r, t = zip(*masked)
            logits[self._tensor(r), self._tensor(t)] = float("-inf")
        if allowed:
            keep = torch.zeros(len(allowed), self.vocab, dtype=torch.bool, device=self.device)
            at = [(k, t) for k, (_, ids) in enumerate(allowed) for t in ids]
            keep[self._tensor([k for k, _ in at]), self._tensor([t for _, t in at])] = True
            idx = self._tensor([i for i, _ in allowed])
            logits[idx] = logits[idx].masked_fill(~keep, float("-inf"))
        if grammar:
            apply_grammar_masks(logits, [i for i, _ in grammar], [m for _, m in grammar])

    def _penalties(self, logits: torch.Tensor, rows: list[tuple[int, Request]]) -> None:
        if not rows:
            return
        slots = self._update_slots([r for _, r in rows])
        idx = self._tensor([i for i, _ in rows])
        counts = self.counts[self._tensor(slots)]
        x = logits[idx]
        params = [r.params for _, r in rows]
        if any(p.repetition_penalty != 1.0 for p in params):
            rep = self._tensor([[p.repetition_penalty] for p in params], x.dtype)
            seen = self.prompt_seen[self._tensor(slots)] | (counts > 0)
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            freq = self._tensor([[p.frequency_penalty] for p in params], x.dtype)
            pres = self._tensor([[p.presence_penalty] for p in params], x.dtype)
            c = counts.to(x.dtype)
            x = x - (freq * c + pres * (c > 0).to(x.dtype))
        logits[idx] = x

    def _update_slots(self, reqs: list[Request]) -> list[int]:
        """Each request's slot, its counts brought up to its last output token."""
        for rid, (req, slot, _) in list(self._slots.items()):
            if req.finished:
                del self._slots[rid]
                self._free.append(slot)
        fresh: list[tuple[int, Request]] = []
        new_rows: list[int] = []
        new_tokens: list[int] = []
        slots = []
        for req in reqs:
            entry = self._slots.get(req.request_id)
            if entry is None or entry[0] is not req:
                entry = (req, self._take_slot(), 0)
                fresh.append((entry[1], req))
            _, slot, counted = entry
            added = req.output_token_ids[counted:]
            new_rows += [slot] * len(added)
            new_tokens += added
            self._slots[req.request_id] = (req, slot, counted + len(added))
            slots.append(slot)
        if fresh:
            at = self._tensor([s for s, _ in fresh])
            self.counts[at] = 0
            self.prompt_seen[at] = False
            seen_rows = [s for s, r in fresh for _ in r.prompt_token_ids]
            seen_ids = [t for _, r in fresh for t in r.prompt_token_ids]
            self.prompt_seen[self._tensor(seen_rows), self._tensor(seen_ids)] = True
        if new_tokens:
            ones = torch.ones(len(new_tokens), dtype=torch.int32, device=self.device)
            self.counts.index_put_((self._tensor(new_rows), self._tensor(new_tokens)), ones, accumulate=True)
        return slots

    def _take_slot(self) -> int:
        if not self._free:
            n = self.counts.shape[0]
            grow = max(8, n)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.vocab)])
            self.prompt_seen = torch.cat([self.prompt_seen, self.prompt_seen.new_zeros(grow, self.vocab)])
            self._free = list(range(n + grow - 1, n - 1, -1))
        return self._free.pop()


def _penalised(p) -> bool:
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def apply_logits_processors(logits: torch.Tensor, reqs: list[Request]) -> None:
    """The edits with a fresh editor (no state kept between calls)."""
    LogitsEditor(logits.shape[-1], logits.device).apply(logits, reqs)
