import os
import shutil

import pytest
from server_helpers import add_byte_tokenizer

os.environ.setdefault("OPENAI_API_KEY", "unused")  # the openai client wants one even when unused


@pytest.fixture(scope="session")
def tiny_text_model(tiny_checkpoints, tmp_path_factory) -> str:
    """A copy of the tiny Llama checkpoint with a byte-level tokenizer and chat template."""
    folder = str(tmp_path_factory.mktemp("tiny-text") / "llama")
    shutil.copytree(tiny_checkpoints["llama"][0], folder)
    add_byte_tokenizer(folder)
    return folder
