"""The offline Python API, shaped like vLLM's: LLM(...).generate(prompts, SamplingParams)."""

from __future__ import annotations

import logging
import weakref
from dataclasses import replace
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from fapool.attention.selector import make_backend
from fapool.engine.arg_utils import EngineArgs
from fapool.engine.llm_engine import LLMEngine, RequestError
from fapool.models.loader import (
    iter_weights,
    load_model_config,
    load_tokenizer,
    release_model_files,
    resolve_model,
)
from fapool.models.registry import build_model
from fapool.outputs import RequestMetrics, RequestOutput
from fapool.sampling_params import RequestOutputKind, SamplingParams
from fapool.worker.model_runner import DTYPES

logger = logging.getLogger(__name__)

PromptType = str | Sequence[int] | dict[str, Any]


def build_engine(args: EngineArgs) -> LLMEngine:
    """Resolve the model, load config, weights and tokenizer, and build the engine."""
    src = resolve_model(args.model)
    model_config = load_model_config(src)
    config = args.create_engine_config(model_config)
    backend = make_backend(config.attention_backend, config.device)
    model = build_model(model_config, backend, DTYPES[config.dtype], config.device)
    if src.format == "preset":
        model.init_random_weights(config.seed)
    else:
        model.load_weights(iter_weights(src))
    release_model_files()
    model.eval()
    if config.sparse_attention:
        from fapool.attention.sparse import enable_sparse_attention

        backend = enable_sparse_attention(model, backend, config.sparse_attention, config.sparse_min_context)
    tokenizer = load_tokenizer(src)
    return LLMEngine(config, model, backend, tokenizer)


class LLM:
    """Generate from a model. `LLM()` loads the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.engine_args = EngineArgs(model=model, **engine_kwargs)
        self.engine = build_engine(self.engine_args)
        # Dropping the LLM (del, garbage collection, interpreter exit) stops its worker
        # processes and releases their process group, as shutdown() does.
        self._finalizer = weakref.finalize(self, self.engine.shutdown)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop any worker processes. Also done on `with LLM(...) as llm:` exit and when the
        LLM is dropped."""
        self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        errors: Literal["raise", "return"] = "raise",
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of the prompts. A prompt the engine rejects (empty, too long,
        out-of-vocabulary ids, bad parameters) raises ValueError naming its index before
        anything runs, as vLLM does; with errors="return" it gets an output with
        finish_reason "error" and the reason in .error, and the others still run.
        `on_output` sees every request's output (text so far) each step it changes, the
        final one included: what streaming to a terminal needs."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        items = _as_prompt_list(prompts)
        if isinstance(sampling_params, Sequence) and not isinstance(sampling_params, SamplingParams):
            if len(sampling_params) != len(items):
                raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(items)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or SamplingParams()] * len(items)

        if on_output is None:  # only the final outputs are returned: none is built before (vLLM's LLM too)
            params_list = [replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params_list]
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        for i, (item, params) in enumerate(zip(items, params_list)):
            try:
                rid = self.engine.add_request(_prompt_of(item), params)
            except RequestError as e:
                if errors == "raise":
                    for queued in order:  # nothing of this call runs
                        if queued not in results:
                            self.engine.abort_request(queued)
                    raise ValueError(f"prompt {i}: {e}") from e
                rid = f"rejected-{len(order)}"
                results[rid] = _error_output(rid, item, str(e))
            order.append(rid)
        self._run(results, len(order), use_tqdm, on_output)
        return [results[rid] for rid in order]

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
        errors: Literal["raise", "return"] = "raise",
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them (`errors`:
        as in generate)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            {
                "prompt_token_ids": _token_ids(
                    self.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=True)
                )
            }
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, errors=errors, on_output=on_output)

    def _run(self, results: dict[str, RequestOutput], total: int, use_tqdm: bool, on_output=None) -> None:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="generating", disable=not use_tqdm, unit="req")
        bar.update(len(results))
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if on_output is not None:
                    on_output(out)
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single list of token ids
    return list(prompts)


def _prompt_of(item: PromptType) -> str | list[int]:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "prompt_token_ids" in item:
            return list(item["prompt_token_ids"])
        if "prompt" in item:
            return item["prompt"]
        raise RequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(item, Sequence):
        return list(item)
    raise RequestError(f"unsupported prompt type {type(item).__name__}")


def _token_ids(encoded) -> list[int]:
    """apply_chat_template returns a list, or a BatchEncoding in newer transformers."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return list(encoded)


def _error_output(rid: str, item: PromptType, message: str) -> RequestOutput:
    import time

    prompt = item if isinstance(item, str) else None
    ids = list(item["prompt_token_ids"]) if isinstance(item, dict) and "prompt_token_ids" in item else []
    return RequestOutput(
        request_id=rid,
        prompt=prompt,
        prompt_token_ids=ids,
        outputs=[],
        finished=True,
        metrics=RequestMetrics(arrival_time=time.monotonic()),
        error=message,
    )
