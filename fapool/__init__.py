"""fapool: an LLM inference engine for long-context decoding."""

from fapool.outputs import CompletionOutput, RequestOutput
from fapool.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers; load it on first use so `import fapool` stays light.
    if name == "LLM":
        from fapool.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
