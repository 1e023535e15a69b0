"""Small quantized models the export tests build the same way."""

import torch


def quantized_cnn(rows: int = 128):
    """A two-convolution CNN on 8x8 inputs, BatchNorm folded, int8-prepared and calibrated on ``rows`` random
    inputs (seeded): the model the diagnose tests export and alter."""
    import qatkit
    from qatkit.components.models import CNN2d
    from qatkit.transform.fold import fold_batchnorm

    torch.manual_seed(0)
    model = CNN2d((1, 8, 8), 10, channels=[8, 16])
    fold_batchnorm(model.eval())
    qatkit.prepare(model, "int8")
    x = torch.randn(rows, 1, 8, 8)
    qatkit.calibrate(model, [x], 1)
    return model.eval(), x
