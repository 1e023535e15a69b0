"""Post-training quantization: observe activation ranges on a few batches, then freeze them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from qatkit.base.batch import call, split_batch
from qatkit.nn.modules import iter_quantizers


def set_fake_quant(model: nn.Module, on: bool) -> None:
    """Switch every fake quantizer in ``model`` on or off (off = the float model, same weights)."""
    for _, q in iter_quantizers(model):
        q.set_fake_quant(on)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int) -> int:
    """Set every quantizer's range from data; returns the number of batches seen.

    A batch is an ``(inputs, target)`` pair as loaders yield it, or the inputs alone (a tensor or a dict);
    inputs of any structure are passed on as the model takes them (see ``base/batch.py``).

    Weights are observed with fake quantization on, so activations are measured as the quantized model
    will produce them. Afterwards activation ranges are frozen; min-max weight ranges keep tracking the
    weights during QAT, while MSE/percentile/learnable weight scales stay as calibrated (trained if LSQ).
    """
    quantizers = [q for _, q in iter_quantizers(model)]
    if not quantizers:
        raise ValueError("calibrate: the model has no quantizers; call qatkit.prepare first")
    acts = [q for q in quantizers if not q.is_weight]
    for q in quantizers:
        q.set_observer(True)
        q.set_fake_quant(q.is_weight)
        q.reset_range()
    was_training = model.training
    model.eval()
    seen = 0
    for batch in batches:
        if seen >= num_batches:
            break
        call(model, split_batch(batch)[0] if isinstance(batch, (list, tuple)) else batch)
        seen += 1
    if seen == 0 and acts:
        raise ValueError("calibrate: no batches to observe activation ranges on")
    for q in quantizers:
        q.set_observer(q.is_weight and q.tracks_every_step)
        q.set_fake_quant(True)
    model.train(was_training)
    return seen
