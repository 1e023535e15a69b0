"""Rebuild a run's models from what the run recorded: the model description (bundled name, import target or
Hugging Face folder, its args and the folder targets are imported from), BatchNorm folding and the quantization
rules. Used by ``qatkit export RUN_DIR`` and :func:`load_packed_model`."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from torch import nn

from qatkit.base.config import format_validation_error
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


def load_packed_model(path: str | Path, trust_code: bool = False) -> nn.Module:
    """A ready-to-run model from a packed file alone: built, BatchNorm folded and prepared as the source was.

    A file that names the user's model code (``model.target``) is refused unless ``trust_code``: qatkit never
    imports code because a file says so (a run's own files are loaded with it).
    """
    from qatkit.recipe import ModelConfig

    meta = read_metadata(path)
    if "model_config" in meta:
        try:
            cfg = ModelConfig.model_validate(meta["model_config"])
        except ValidationError as e:
            raise CheckpointError(f"{path}: model_config: {format_validation_error(e, ModelConfig)}") from None
        if cfg.target is not None and not trust_code:
            raise CheckpointError(f"{path}: the file names model code to import ({cfg.target!r} from "
                                  f"{meta.get('base_dir')}); if you made this file, load_packed_model(path, "
                                  "trust_code=True), else build the model yourself and use apply_packed")  # fmt: skip
        _check_build_info(path, meta)
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


def _check_build_info(path: str | Path, meta: dict) -> None:
    """Refuse build fields of the wrong type or size (they size the model that is built)."""
    shape, n = meta.get("input_shape"), meta.get("num_outputs")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 8
        or not all(type(d) is int and 0 < d <= 1 << 24 for d in shape)
    ):
        raise CheckpointError(f"{path}: input_shape must be 1 to 8 positive sizes, got {shape!r}")
    if type(n) is not int or not 1 <= n <= 1 << 20:
        raise CheckpointError(f"{path}: num_outputs must be a positive integer, got {n!r}")
    if type(meta.get("folded")) is not bool or not isinstance(meta.get("base_dir"), (str, type(None))):
        raise CheckpointError(f"{path}: folded must be true/false and base_dir a folder name")
