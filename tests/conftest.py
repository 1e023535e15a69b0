"""Shared fixtures: tiny models and data made in the test itself."""

import pytest
import torch

from qatkit.models import MLP, TinyTransformer


@pytest.fixture
def tiny_transformer() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer((6, 10), 4, dim=16, heads=2, ffn=32, layers=2)


@pytest.fixture
def tiny_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP((1, 8, 8), 10, hidden=[32, 16])
