"""Per-request edits of the logits before sampling, with vLLM's meanings:

    repetition_penalty   tokens seen in the prompt or output: positive logits / p, negative * p
    presence_penalty     minus p for every token the output already holds (OpenAI)
    frequency_penalty    minus p times the token's count in the output (OpenAI)
    logit_bias           plus the given bias per token id
    min_tokens           end-of-sequence and stop tokens masked until that many tokens exist
    bad_words            a word's last token masked where the output ends with its other tokens
    allowed_token_ids    every other token masked
    structured_outputs   tokens the request's grammar does not allow next masked (llguidance)

They need each request's token history, so a step with such a request runs synchronously (the
engine applies them to the due rows on the device, then samples); every other request keeps the
device sampler's asynchronous path.
"""

from __future__ import annotations

import torch

from fapool.layers.structured import apply_grammar_mask
from fapool.request import Request


def needs_processing(req: Request) -> bool:
    return req.params.has_logits_processing


@torch.inference_mode()
def apply_logits_processors(logits: torch.Tensor, reqs: list[Request]) -> None:
    """Edit logits [N, V] in place, row i for reqs[i] (rows of requests without any are untouched)."""
    vocab = logits.shape[-1]
    dev = logits.device
    for i, req in enumerate(reqs):
        if not needs_processing(req):
            continue
        p = req.params
        row = logits[i]
        out = torch.tensor(req.output_token_ids, dtype=torch.long, device=dev)
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
            seen[torch.tensor(req.prompt_token_ids, dtype=torch.long, device=dev)] = True
            seen[out] = True
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalised, row))
        if (p.presence_penalty or p.frequency_penalty) and out.numel():
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=dev)
            row.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype, device=dev))
        masked: list[int] = []
        if len(req.output_token_ids) < p.min_tokens:
            masked += list(p.stop_token_ids) + ([] if p.ignore_eos else list(req.eos_token_ids))
        for word in req.bad_words_token_ids:
            if len(word) == 1 or req.output_token_ids[-(len(word) - 1) :] == word[:-1]:
                masked.append(word[-1])
        if masked:
            row[torch.tensor(masked, dtype=torch.long, device=dev)] = float("-inf")
        if p.allowed_token_ids:
            keep = torch.zeros(vocab, dtype=torch.bool, device=dev)
            keep[torch.tensor(p.allowed_token_ids, dtype=torch.long, device=dev)] = True
            row.masked_fill_(~keep, float("-inf"))
        if req.matcher is not None:
            apply_grammar_mask(row, req.matcher)
