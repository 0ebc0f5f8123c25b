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

Under async scheduling a step with such a request launches in halves (LLMEngine._launch): the
forward pass, these edits of the due rows on the device, then the draw. The penalties' counts
take the in-flight step's tokens on the device; a grammar or a bad word of several tokens reads
the latest tokens' values (needs_token_values), so for those the host first processes the
previous step while the forward pass runs. Executors that cannot split a launch step
synchronously.
"""

from __future__ import annotations

import numpy as np
import torch

from fapool.layers.structured import apply_grammar_masks
from fapool.request import Request


def needs_processing(req: Request) -> bool:
    return req.params.has_logits_processing


def needs_token_values(req: Request) -> bool:
    """Whether the edits read the values of the request's latest tokens (a grammar, a bad word of
    several tokens), not only their number: then every earlier token must be on the host. The
    penalties' counts follow tokens still on the device (LogitsEditor.apply's in_flight)."""
    return req.matcher is not None or any(len(w) > 1 for w in req.bad_words_token_ids)


class _Upload:
    """The host-side index and value lists of one edit, sent to the device in one copy (pinned
    on CUDA: a copy from pageable memory would wait for the queued forward pass): the int64
    values, then the float32 ones, in one byte buffer."""

    def __init__(self) -> None:
        self._ints: list[int] = []
        self._floats: list[float] = []
        self._at: dict[str, tuple[bool, int, int]] = {}
        self._dev: dict[bool, torch.Tensor] = {}

    def put(self, name: str, values, floating: bool = False) -> None:
        buf = self._floats if floating else self._ints
        self._at[name] = (floating, len(buf), len(values))
        buf.extend(values)

    def send(self, device: torch.device) -> None:
        ni, nf = 8 * len(self._ints), 4 * len(self._floats)
        pin = device.type == "cuda" and ni + nf > 0
        host = torch.empty(ni + nf, dtype=torch.uint8, pin_memory=pin)
        buf = host.numpy()
        buf[:ni].view(np.int64)[:] = self._ints
        buf[ni:].view(np.float32)[:] = self._floats
        dev = host.to(device, non_blocking=pin)
        self._dev[False] = dev[:ni].view(torch.int64)
        self._dev[True] = dev[ni:].view(torch.float32)

    def __getitem__(self, name: str) -> torch.Tensor:
        floating, start, n = self._at[name]
        return self._dev[floating][start : start + n]


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

    @torch.inference_mode()
    def apply(
        self,
        logits: torch.Tensor,
        reqs: list[Request],
        in_flight: tuple[torch.Tensor | None, dict[str, int]] | None = None,
    ) -> None:
        """Edit logits [N, V] in place, row i for reqs[i]. Rows of requests without any edit, or
        already finished (async scheduling: a row drawn blind, whose token is dropped), are untouched.
        `in_flight`: (tokens, request id -> row) of a step whose tokens are not on the host yet
        (async scheduling); each listed request's latest token is that row, counted on the device.
        Requests that needs_token_values must have every token on the host."""
        tokens, at = in_flight if in_flight is not None else (None, {})
        rows = [(i, r) for i, r in enumerate(reqs) if needs_processing(r) and not r.finished]
        if not rows:
            return
        up = _Upload()
        pen = [(i, r) for i, r in rows if _penalised(r.params)]
        fused = logits.is_cuda and logits.dtype == torch.float32  # the Triton launch (_penalties)
        flight = False  # a penalised row counts its in-flight token
        if pen:
            flight = self._stage_penalties(up, pen, at, fused)
        bias: list[tuple[int, int, float]] = []
        masked: list[tuple[int, int]] = []
        allowed: list[tuple[int, list[int]]] = []
        grammar: list[tuple[int, object]] = []
        for i, req in rows:
            p = req.params
            bias += [(i, t, b) for t, b in p.logit_bias]
            if len(req.output_token_ids) + (req.request_id in at) < p.min_tokens:
                stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(req.eos_token_ids))
                masked += [(i, t) for t in stops]
            for word in req.bad_words_token_ids:
                if len(word) == 1 or req.output_token_ids[-(len(word) - 1) :] == word[:-1]:
                    masked.append((i, word[-1]))
            if p.allowed_token_ids:
                allowed.append((i, list(p.allowed_token_ids)))
            if req.matcher is not None:
                grammar.append((i, req.matcher))
        up.put("bias_rows", [i for i, _, _ in bias])
        up.put("bias_ids", [t for _, t, _ in bias])
        up.put("bias", [b for _, _, b in bias], floating=True)
        up.put("mask_rows", [i for i, _ in masked])
        up.put("mask_ids", [t for _, t in masked])
        pairs = [(k, t) for k, (_, ids) in enumerate(allowed) for t in ids]
        up.put("allowed_rows", [i for i, _ in allowed])
        up.put("allowed_k", [k for k, _ in pairs])
        up.put("allowed_ids", [t for _, t in pairs])
        up.send(self.device)

        if pen:
            assert tokens is not None or not flight
            self._penalties(logits, up, [r.params for _, r in pen], tokens if flight else None, fused)
        if bias:
            logits.index_put_((up["bias_rows"], up["bias_ids"]), up["bias"].to(logits.dtype), accumulate=True)
        if masked:
            logits[up["mask_rows"], up["mask_ids"]] = float("-inf")
        if allowed:
            keep = torch.zeros(len(allowed), self.vocab, dtype=torch.bool, device=self.device)
            keep[up["allowed_k"], up["allowed_ids"]] = True
            idx = up["allowed_rows"]
            logits[idx] = logits[idx].masked_fill(~keep, float("-inf"))
        if grammar:
            apply_grammar_masks(logits, [i for i, _ in grammar], [m for _, m in grammar])

    def _stage_penalties(
        self, up: _Upload, rows: list[tuple[int, Request]], in_flight: dict[str, int], fused: bool = False
    ) -> bool:
        """Each penalised request's slot (a new one zeroed and given its prompt's tokens), and the
        output tokens added since the last call, to be counted: from the host, and the one still
        in flight from its row of the in-flight tokens. `fused`: the Triton launch counts one
        token a row itself (the in-flight one, else a single new one from the host), so a
        decode step's counting needs no separate scatter (index_put_ with accumulate costs a
        dozen small launches of host time). Returns whether a row counts its in-flight token."""
        for rid, (req, slot, _) in list(self._slots.items()):
            if req.finished:
                del self._slots[rid]
                self._free.append(slot)
        fresh: list[tuple[int, Request]] = []
        new_rows: list[int] = []
        new_tokens: list[int] = []
        flight_slots: list[int] = []
        flight_rows: list[int] = []
        slots = []
        add: list[int] = []  # fused: per row, a host token the launch counts (-1: none)
        frows: list[int] = []  # fused: per row, its row of the in-flight tokens (-1: none)
        for _, req in rows:
            entry = self._slots.get(req.request_id)
            if entry is None or entry[0] is not req:
                entry = (req, self._take_slot(), 0)
                fresh.append((entry[1], req))
            _, slot, counted = entry
            out = req.output_token_ids
            added = out[counted:] if counted < len(out) else []
            counted += len(added)
            row = in_flight.get(req.request_id)
            if row is None or counted != len(out):  # none in flight, or counted already
                row = -1
            else:
                counted += 1
            if fused and row < 0 and len(added) == 1:
                add.append(added[0])
            else:
                new_rows += [slot] * len(added)
                new_tokens += added
                add.append(-1)
            if row >= 0 and not fused:
                flight_slots.append(slot)
                flight_rows.append(row)
            frows.append(row)
            self._slots[req.request_id] = (req, slot, counted)
            slots.append(slot)
        up.put("pen_rows", [i for i, _ in rows])
        up.put("pen_slots", slots)
        up.put("fresh", [s for s, _ in fresh])
        up.put("seen_rows", [s for s, r in fresh for _ in r.prompt_token_ids])
        up.put("seen_ids", [t for _, r in fresh for t in r.prompt_token_ids])
        up.put("new_rows", new_rows)
        up.put("new_ids", new_tokens)
        up.put("flight_slots", flight_slots)
        up.put("flight_rows", flight_rows)
        up.put("pen_add", add)
        up.put("pen_frows", frows)
        params = [r.params for _, r in rows]
        up.put("rep", [p.repetition_penalty for p in params], floating=True)
        up.put("freq", [p.frequency_penalty for p in params], floating=True)
        up.put("pres", [p.presence_penalty for p in params], floating=True)
        return any(r >= 0 for r in frows)

    def _penalties(
        self,
        logits: torch.Tensor,
        up: _Upload,
        params: list,
        in_flight: torch.Tensor | None,
        fused: bool = False,
    ) -> None:
        fresh = up["fresh"]
        if fresh.numel():
            self.counts[fresh] = 0
            self.prompt_seen[fresh] = False
            self.prompt_seen[up["seen_rows"], up["seen_ids"]] = True
        new_ids = up["new_ids"]
        if new_ids.numel():
            ones = torch.ones(new_ids.shape, dtype=torch.int32, device=self.device)
            self.counts.index_put_((up["new_rows"], new_ids), ones, accumulate=True)
        flight = up["flight_rows"]
        if flight.numel():
            ones = torch.ones(flight.shape, dtype=torch.int32, device=self.device)
            self.counts.index_put_((up["flight_slots"], in_flight.index_select(0, flight)), ones, accumulate=True)
        idx, slots = up["pen_rows"], up["pen_slots"]
        if fused:  # one launch instead of about twenty, the step's one new token a row counted in it
            from fapool.layers.triton_penalties import apply_penalties_triton

            apply_penalties_triton(
                logits, idx, slots, self.counts, self.prompt_seen, up["rep"], up["freq"], up["pres"],
                up["pen_add"], in_flight, up["pen_frows"],
            )
            return
        counts = self.counts[slots]
        x = logits[idx]
        if any(p.repetition_penalty != 1.0 for p in params):
            rep = up["rep"].to(x.dtype)[:, None]
            seen = self.prompt_seen[slots] | (counts > 0)
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            c = counts.to(x.dtype)
            x = x - (up["freq"].to(x.dtype)[:, None] * c + up["pres"].to(x.dtype)[:, None] * (c > 0).to(x.dtype))
        logits[idx] = x

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
