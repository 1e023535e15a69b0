"""LUT model checkpoints of a causal LM: only the LUT layers' tensors, plus what is needed to rebuild the model.

The rest of the model (embeddings, norms, lm_head) is the base model's, so a checkpoint names its base (a
folder, a .gguf file or ``smollm2``) and the tokenizer's fingerprint; loading refuses another tokenizer.
Everything read is checked before the model changes: layer names and settings against the model, tensor
names, shapes, dtypes and finiteness against the layers they rebuild, indices against their tables.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from qatkit.io.checkpoint import CheckpointError, VerifiedWeights, check_state_fits, read_metadata, save_weights
from qatkit.lm.rules import layer_specs, lut_layers, set_trainable
from qatkit.nn.lut_linear import LUTLinear, LUTSpec

KIND = "lut-lm"


def save_lut_model(
    path: str | Path, model: nn.Module, *, base: str, tokenizer_fp: str, extra: dict | None = None,
    state: dict | None = None,
):  # fmt: skip
    """Write the LUT layers' state (tables, scales, indices, latent weights, frozen flags) atomically;
    ``state``: the model's full state dict where its own is sharded (FSDP)."""
    names = lut_layers(model)
    if state is None:
        state = {f"{n}.{k}": v for n, m in names.items() for k, v in m.state_dict().items()}
    else:
        state = {k: v for k, v in state.items() if k.rpartition(".")[0] in names}
    meta = {"kind": KIND, "base": base, "tokenizer": tokenizer_fp, "layers": layer_specs(model), **(extra or {})}
    return save_weights(path, state, meta)


def check_record(source: str | Path, record: dict) -> None:
    """Refuse a checkpoint record without string ``base`` and ``tokenizer`` and a mapping of ``layers``."""
    for key in ("base", "tokenizer"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise CheckpointError(f"{source}: {key!r} must be a non-empty string, got {record.get(key)!r}")
    if not isinstance(record.get("layers"), dict) or not record["layers"]:
        raise CheckpointError(f"{source}: 'layers' must be a non-empty mapping of layer name to LUT settings")


def lut_templates(source: str | Path, model: nn.Module, specs: dict, released: Collection[str] = ()) -> dict:
    """The LUT layers ``specs`` describe, empty on the meta device (no memory), to check tensors against; those in
    ``released`` without a latent weight.

    Refuses a name that is not a Linear layer of ``model`` and invalid settings; an existing LUT layer is its own.
    """
    linear = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, LUTLinear))}
    out = {}
    for name, spec in specs.items():
        m = linear.get(name)
        if m is None:
            shown = ", ".join(list(linear)[:6]) + (f" (+{len(linear) - 6} more)" if len(linear) > 6 else "")
            raise CheckpointError(f"{source}: layers: {name!r} is not a Linear layer of {type(model).__name__} "
                                  f"(its Linear layers: {shown or 'none'})")  # fmt: skip
        try:
            s = LUTSpec.from_dict(spec)
            with torch.device("meta"):
                out[name] = m if isinstance(m, LUTLinear) else LUTLinear(m.in_features, m.out_features,
                                                                         m.bias is not None, s, name not in released)  # fmt: skip
        except ValueError as e:
            raise CheckpointError(f"{source}: layers: {name!r}: {e}") from None
    return out


def check_indices(source: str | Path, name: str, index: torch.Tensor, entries: int) -> None:
    """Refuse LUT indices that point past the end of their table of ``entries`` entries."""
    if index.numel() and int(index.max()) >= entries:
        raise CheckpointError(f"{source}: tensor {name!r} holds index {int(index.max())}, but its table has only "
                              f"{entries} entries")  # fmt: skip


def check_weight_finite(source: str | Path, name: str, weight: torch.Tensor) -> None:
    """Refuse a layer whose table values times scales overflow to inf (each finite on its own)."""
    if not bool(torch.isfinite(weight).all()):
        raise CheckpointError(f"{source}: layer {name!r}: table values times scales overflow to inf or NaN")


def read_lut_metadata(path: str | Path) -> dict:
    """The checked metadata of a LUT checkpoint (kind, base, tokenizer, layers)."""
    meta = read_metadata(path)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a LUT model checkpoint (kind {meta.get('kind')!r}, expected {KIND!r})")
    check_record(path, meta)
    return meta


def apply_lut_checkpoint(model: nn.Module, path: str | Path, tokenizer_fp: str | None = None) -> dict:
    """Give ``model`` (the float base) the checkpoint's LUT layers and load their state; returns the metadata.

    The file is checked in full before the model changes — one tensor at a time, then each layer built on its
    own for the overflow check — and layers with a latent weight are read again one by one as each float layer
    is replaced: their latent weights never sit in memory beside all the float weights they replace."""
    meta = read_lut_metadata(path)
    if tokenizer_fp is not None and meta["tokenizer"] != tokenizer_fp:
        raise CheckpointError(f"{path}: made with another tokenizer (fingerprint {meta['tokenizer']}, this model's "
                              f"tokenizer is {tokenizer_fp})")  # fmt: skip
    layers = meta["layers"]
    full = lut_templates(path, model, layers)
    flags = {}

    def check(name: str, t: torch.Tensor) -> None:  # on each tensor as it is read
        layer, _, key = name.rpartition(".")
        m = full.get(layer)
        if m is not None and key == "index" and t.dtype == torch.uint8 and t.shape == m.index.shape:
            check_indices(path, name, t, m.lut.shape[1])
        if m is not None and key in ("frozen", "weight"):
            flags[name] = t.numel() == 0 if key == "weight" else t.numel() == 1 and bool(t)

    with VerifiedWeights(path, check=check) as f:
        released = {n for n in layers if flags.get(f"{n}.frozen") and flags.get(f"{n}.weight")}
        templates = lut_templates(path, model, layers, released)
        check_state_fits(path, layer_state(templates), f.stored, finite=False)
        kept = {}  # layers without a latent weight are small (indices, tables, scales): built once and kept
        for n in templates:  # every layer's table values times scales finite, before any layer is replaced
            m = _loaded(model, n, layers[n], n in released, f)
            with torch.no_grad():
                check_weight_finite(path, n, m.dequantized_weight())
            if n in released:
                kept[n] = m
            del m
        for n in templates:  # a layer with a latent weight is read again, so that only one is built at a time
            model.set_submodule(n, kept.pop(n) if n in kept else _loaded(model, n, layers[n], False, f))
    set_trainable(model)
    return meta


def _loaded(model: nn.Module, name: str, spec: dict, released: bool, f: VerifiedWeights) -> LUTLinear:
    """Layer ``name`` of the checkpoint, built beside the model's layer (float or LUT, left as it is) and loaded
    from the open file."""
    old = model.get_submodule(name)
    m = LUTLinear(old.in_features, old.out_features, old.bias is not None, LUTSpec.from_dict(spec), not released)
    m.to(next(old.parameters()).device)
    got = f.read([f"{name}.{k}" for k in m.state_dict()])
    m.load_state_dict({k.removeprefix(f"{name}."): v for k, v in got.items()})
    return m


def layer_state(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The state dicts of named layers, keyed as in the whole model."""
    return {f"{n}.{k}": v for n, m in layers.items() for k, v in m.state_dict().items()}


def load_lut_model(path: str | Path, base: str | None = None):
    """The base model and tokenizer with the checkpoint's LUT layers: ``(model, tokenizer, metadata)``."""
    from qatkit.lm.hf import load_causal_lm, tokenizer_fingerprint

    meta = read_lut_metadata(path)
    model, tok = load_causal_lm(base or meta["base"])
    apply_lut_checkpoint(model, path, tokenizer_fingerprint(tok))
    return model, tok, meta
