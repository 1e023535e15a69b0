"""Shared fixtures: tiny models and data made in the test itself."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub: everything is made locally

from qatkit.components.models import MLP, TinyTransformer


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state, whatever was imported or run before it (optional exporters
    consume random numbers at import)."""
    torch.manual_seed(1234)


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Environment for runs compared bit for bit (resume tests). With two threads, a plain FP32 training step differed
in the last bit between two processes now and then on a loaded machine (presumably MKL's threading); the runs' own logic
was exact with a kill after every checkpoint write. One thread removes that noise from the comparison."""


@pytest.fixture
def one_thread(monkeypatch):
    """This test and the processes it starts compute on one thread (see ONE_THREAD)."""
    for k, v in ONE_THREAD.items():
        monkeypatch.setenv(k, v)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_transformer() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer((6, 10), 4, dim=16, heads=2, ffn=32, layers=2)


@pytest.fixture
def tiny_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP((1, 8, 8), 10, hidden=[32, 16])


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny Llama causal LM + word-level tokenizer saved with save_pretrained (built offline, once per session)."""
    pytest.importorskip("transformers")
    from tiny_lm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """A tiny Qwen3 causal LM + word-level tokenizer saved with save_pretrained."""
    pytest.importorskip("transformers")
    from tiny_lm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny_qwen3"), arch="qwen3")


@pytest.fixture(scope="session")
def kd_cache_dir(tiny_lm_dir, tmp_path_factory):
    """A KD cache of the tiny Llama over its own sample text (top-6 + 6 negatives, windows of 24 tokens)."""
    from qatkit.lm.cache import build_kd_cache
    from qatkit.lm.corpus import tokenize_corpus
    from qatkit.lm.hf import load_causal_lm
    from tiny_lm import SAMPLE_TEXT

    model, tok = load_causal_lm(tiny_lm_dir)
    seqs = tokenize_corpus([SAMPLE_TEXT] * 3, tok, 24)
    out = tmp_path_factory.mktemp("cache") / "kd"
    build_kd_cache(
        model, tok, seqs, out, teacher_name="tiny", top_k=6, negatives=6, eval_fraction=0.2, log=lambda *_: None
    )
    return out
