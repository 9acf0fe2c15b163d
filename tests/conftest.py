import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (hidden 64, 2 layers) with the built-in world's word tokenizer, saved as an HF folder."""
    from alignkit.examples import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from alignkit.models.load import load_tokenizer

    return load_tokenizer(tiny_model_dir)
