"""LUT model checkpoints of a causal LM: only the LUT layers' tensors, plus what is needed to rebuild the model.

The rest of the model (embeddings, norms, lm_head) is the base model's, so a checkpoint names its base (a
folder, a .gguf file or ``smollm2``) and the tokenizer's fingerprint; loading refuses another tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qatkit.io.checkpoint import CheckpointError, check_state_fits, load_weights, read_metadata, save_weights
from qatkit.lm.rules import layer_specs, lut_layers, rebuild_lm, set_trainable

KIND = "lut-lm"


def save_lut_model(path: str | Path, model: nn.Module, *, base: str, tokenizer_fp: str, extra: dict | None = None):
    """Write the LUT layers' state (tables, scales, indices, latent weights, frozen flags) atomically."""
    names = lut_layers(model)
    state = {f"{n}.{k}": v for n, m in names.items() for k, v in m.state_dict().items()}
    meta = {"kind": KIND, "base": base, "tokenizer": tokenizer_fp, "layers": layer_specs(model), **(extra or {})}
    return save_weights(path, state, meta)


def read_lut_metadata(path: str | Path) -> dict:
    meta = read_metadata(path)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a LUT model checkpoint (kind {meta.get('kind')!r}, expected {KIND!r})")
    return meta


def apply_lut_checkpoint(model: nn.Module, path: str | Path, tokenizer_fp: str | None = None) -> dict:
    """Give ``model`` (the float base) the checkpoint's LUT layers and load their state; returns the metadata."""
    meta = read_lut_metadata(path)
    if tokenizer_fp is not None and meta["tokenizer"] != tokenizer_fp:
        raise CheckpointError(f"{path}: made with another tokenizer (fingerprint {meta['tokenizer']}, this model's "
                              f"tokenizer is {tokenizer_fp})")  # fmt: skip
    state = load_weights(path)
    rebuild_lm(model, meta["layers"])
    layers = lut_layers(model)
    check_state_fits(path, {f"{n}.{k}": v for n, m in layers.items() for k, v in m.state_dict().items()}, state)
    model.load_state_dict(state, strict=False)
    set_trainable(model)
    return meta


def load_lut_model(path: str | Path, base: str | None = None):
    """The base model and tokenizer with the checkpoint's LUT layers: ``(model, tokenizer, metadata)``."""
    from qatkit.lm.hf import load_causal_lm, tokenizer_fingerprint

    meta = read_lut_metadata(path)
    model, tok = load_causal_lm(base or meta["base"])
    apply_lut_checkpoint(model, path, tokenizer_fingerprint(tok))
    return model, tok, meta
