"""Rebuild a run's models from what the run recorded: the model description (bundled name, import target or
Hugging Face folder, its args and the folder targets are imported from), BatchNorm folding and the quantization
rules. Used by ``qatkit export RUN_DIR`` and :func:`load_packed_model`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qatkit.components.models import build_model, make_model
from qatkit.export.packed import apply_packed
from qatkit.io.checkpoint import CheckpointError, read_metadata
from qatkit.transform.fold import fold_batchnorm
from qatkit.transform.prepare import prepare


def build_info(model_cfg, base_dir: Path | None, input_shape, num_outputs: int, folded: bool, quant) -> dict:
    """What :func:`load_packed_model` needs to rebuild the model (stored in packed files)."""
    quant = quant.model_dump(mode="json") if hasattr(quant, "model_dump") else quant
    return {"model_config": model_cfg.model_dump(mode="json"), "base_dir": None if base_dir is None else str(base_dir),
            "input_shape": list(input_shape), "num_outputs": num_outputs, "folded": folded, "quant": quant}  # fmt: skip


def float_model(model_cfg, base_dir: Path | None, input_shape, num_outputs: int, folded: bool) -> nn.Module:
    """The recipe's model, built afresh, with BatchNorm folded when the run folded it."""
    model = make_model(model_cfg, tuple(input_shape), num_outputs, base_dir)
    if folded:
        fold_batchnorm(model)
    return model


def load_packed_model(path: str | Path) -> nn.Module:
    """A ready-to-run model from a packed file alone: built, BatchNorm folded and prepared as the source was."""
    from qatkit.recipe import ModelConfig

    meta = read_metadata(path)
    if "model_config" in meta:
        cfg = ModelConfig.model_validate(meta["model_config"])
        base = Path(meta["base_dir"]) if meta.get("base_dir") else None
        model = float_model(cfg, base, meta["input_shape"], meta["num_outputs"], meta["folded"])
    elif {"model", "model_args", "input_shape", "num_classes", "folded"} <= set(meta):  # files of qatkit <= 0.1
        model = build_model(meta["model"], tuple(meta["input_shape"]), meta["num_classes"], **meta["model_args"])
        if meta["folded"]:
            fold_batchnorm(model)
    else:
        raise CheckpointError(f"{path}: packed file has no model description; build the model yourself and use "
                              "apply_packed")  # fmt: skip
    if "quant" not in meta:
        raise CheckpointError(f"{path}: packed file does not say how the model was quantized (no 'quant')")
    prepare(model, meta["quant"])
    return apply_packed(model, path)
