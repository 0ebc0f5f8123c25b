import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny_models.py

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{arch: (folder, transformers model)} for llama (GQA, llama3 rope), qwen2 (bias, tied),
    mistral (MHA)."""
    from tiny_models import ARCHS, make_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {arch: (str(root / arch), make_checkpoint(str(root / arch), arch, seed=i)) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def smollm2_llm():
    """The embedded SmolLM2-135M-Instruct through fapool (float32, CPU)."""
    from fapool import LLM

    return LLM(device="cpu", dtype="float32", kv_cache_memory=256 << 20)


@pytest.fixture(scope="session")
def tiny_text_model(tiny_checkpoints, tmp_path_factory) -> str:
    """A copy of the tiny Llama checkpoint with a byte-level tokenizer and chat template."""
    from tiny_models import add_byte_tokenizer

    folder = str(tmp_path_factory.mktemp("tiny-text") / "llama")
    shutil.copytree(tiny_checkpoints["llama"][0], folder)
    add_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray instance for every Ray test (an engine leaves a Ray it did not start running)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
