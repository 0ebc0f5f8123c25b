"""fapool: an LLM inference engine for long-context decoding."""

from importlib.metadata import PackageNotFoundError, version

from fapool.outputs import CompletionOutput, RequestOutput
from fapool.sampling_params import RequestOutputKind, SamplingParams

try:
    __version__ = version("fapool")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["LLM", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers; load it on first use so `import fapool` stays light.
    if name == "LLM":
        from fapool.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
