"""Which Linear layers of a causal LM get LUT weights, with how many bits and what scale rank (seed 004).

A config is data (``LMQuantConfig``): a preset such as ``Q2_A4`` (MLP gate/up/down 2-bit LUT with rank-32
scales, attention q/k/v/o 4-bit with rank 8) or explicit rules, plus the ``mlp_only`` and ``g_only`` switches.
Rules match qualified module names with globs (or ``re:REGEX``); a rule that matches no layer is an error.
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from qatkit.base.config import RecipeError, Strict
from qatkit.nn.lut_linear import LUTLinear, LUTSpec
from qatkit.transform.prepare import name_matches

MLP_PATTERNS = ["*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"]
ATTENTION_PATTERNS = ["*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.o_proj"]


class LUTRule(Strict):
    """One group of layers: name patterns and the LUT settings they get."""

    name: str
    match: list[str] = Field(min_length=1)
    exclude: list[str] = []
    bits: int = Field(2, ge=1, le=8)
    rank: int = Field(32, ge=1)
    group_rows: Optional[int] = Field(None, ge=1, description="output channels per table (None: one per layer)")
    learnable_lut: bool = True
    kmeans_weighting: Literal["uniform", "magnitude"] = "magnitude"
    normalizer_grad: bool = False
    attention: bool = False


def _preset(mlp_bits: int, mlp_rank: int, attn_bits: int, attn_rank: int) -> list[LUTRule]:
    """Per-row tables (``group_rows: 1``): on SmolLM2 Q2_A4 they start 11x better than one table per layer and
    reach 11x lower perplexity after 40 KD steps, for 0.04-0.44 extra bits per weight (bench/README.md)."""
    return [LUTRule(name="mlp", match=MLP_PATTERNS, bits=mlp_bits, rank=mlp_rank, group_rows=1),
            LUTRule(name="attention", match=ATTENTION_PATTERNS, bits=attn_bits, rank=attn_rank, group_rows=1,
                    attention=True)]  # fmt: skip


PRESETS = {
    "Q2_A3": lambda: _preset(2, 4, 3, 4),  # 2.56 bits per weight on disk: the best point <= 2.6 (bench/lm_bits.py)
    "Q2_A4": lambda: _preset(2, 32, 4, 8),  # 3.73 bits per weight
    "Q4_A4": lambda: _preset(4, 4, 4, 4),
    "Q4_A8": lambda: _preset(4, 8, 8, 8),
}


class LMQuantConfig(Strict):
    """LUT quantization of an LM: a preset or rules, the scale form, and the training switches."""

    preset: Optional[Literal["Q2_A3", "Q2_A4", "Q4_A4", "Q4_A8"]] = "Q2_A4"
    rules: list[LUTRule] = []
    form: Literal["v1", "v2"] = "v1"
    ste_fp16: bool = False
    mlp_only: bool = False
    g_only: bool = False

    @model_validator(mode="after")
    def _check(self) -> LMQuantConfig:
        if self.preset is None and not self.rules:
            raise ValueError(f"give a preset ({', '.join(PRESETS)}) or at least one rule")
        if self.g_only and self.form != "v2":
            raise ValueError("g_only trains the V2 magnitudes only; it needs form: v2")
        return self

    def resolved_rules(self) -> list[LUTRule]:
        rules = list(self.rules) + (PRESETS[self.preset]() if self.preset else [])
        return [r for r in rules if not (self.mlp_only and r.attention)]

    def spec(self, rule: LUTRule) -> LUTSpec:
        return LUTSpec(bits=rule.bits, rank=rule.rank, group_rows=rule.group_rows, form=self.form,
                       learnable_lut=rule.learnable_lut, ste_fp16=self.ste_fp16,
                       kmeans_weighting=rule.kmeans_weighting, normalizer_grad=rule.normalizer_grad)  # fmt: skip


@dataclass
class LUTReport:
    """Which layers became LUTLinear, with their settings, and the ones left in float."""

    layers: dict[str, dict] = field(default_factory=dict)
    float_linear: list[str] = field(default_factory=list)

    def summary(self) -> str:
        n = sum(v["params"] for v in self.layers.values())
        return (f"{len(self.layers)} Linear layers LUT-quantized ({n:,} weights); {len(self.float_linear)} Linear "
                "layers left in float (embeddings and lm_head are never quantized)")  # fmt: skip


def plan_lut(model: nn.Module, cfg: LMQuantConfig) -> dict[str, tuple[LUTRule, LUTSpec]]:
    """Decide which Linear layers each rule takes (first matching rule wins); a rule matching nothing is an error."""
    rules = cfg.resolved_rules()
    decided, hits = {}, [0] * len(rules)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        for i, rule in enumerate(rules):
            if name_matches(name, rule.match) and not name_matches(name, rule.exclude):
                hits[i] += 1
                decided.setdefault(name, (rule, cfg.spec(rule)))
    for rule, n in zip(rules, hits, strict=True):
        if n == 0:
            shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
            raise RecipeError(f"LUT rule {rule.name!r} ({', '.join(rule.match)}) matches no Linear layer; "
                              f"Linear layers are: {shown or 'none'}")  # fmt: skip
    return decided


def prepare_lm(model: nn.Module, cfg: LMQuantConfig, log=None) -> LUTReport:
    """Swap the chosen Linear layers for LUTLinear (k-means tables, rank-1 start scales) in place."""
    decided = plan_lut(model, cfg)
    report = LUTReport()
    for i, (name, (rule, spec)) in enumerate(decided.items()):
        linear = model.get_submodule(name)
        model.set_submodule(name, LUTLinear.from_linear(linear, spec))
        report.layers[name] = {"rule": rule.name, **spec.to_dict(), "params": linear.weight.numel()}
        if log is not None and (i + 1) % 50 == 0:
            log(f"  quantized {i + 1}/{len(decided)} layers")
    report.float_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    set_trainable(model, cfg.g_only)
    return report


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """Every LUTLinear's settings by name (what a checkpoint records to rebuild the model)."""
    return {n: m.spec.to_dict() for n, m in model.named_modules() if isinstance(m, LUTLinear)}


def rebuild_lm(model: nn.Module, specs: dict[str, dict | LUTSpec], released: Collection[str] = ()) -> None:
    """Give a float model the LUTLinear layers a checkpoint describes (empty; load the state dict next); those in
    ``released`` get no latent weight (their stored indices are frozen and stand for it)."""
    for name, spec in specs.items():
        linear = model.get_submodule(name)
        if isinstance(linear, LUTLinear):
            continue
        if not isinstance(linear, nn.Linear):
            raise RecipeError(f"checkpoint names LUT layer {name!r} but the model has {type(linear).__name__} there")
        s = spec if isinstance(spec, LUTSpec) else LUTSpec.from_dict(spec)
        m = LUTLinear(linear.in_features, linear.out_features, linear.bias is not None, s, name not in released)
        model.set_submodule(name, m.to(linear.weight.device))


def lut_layers(model: nn.Module) -> dict[str, LUTLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LUTLinear)}


def set_trainable(model: nn.Module, g_only: bool = False) -> int:
    """Train only the LUT layers (tables, scales, latent weights not yet frozen, biases); ``g_only``: magnitudes.

    Returns the number of trainable parameters. Embeddings, norms and lm_head stay as the teacher has them.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lut_layers(model).values():
        if g_only:
            if m.spec.form != "v2":
                raise RecipeError("g_only needs V2 layers (convert with to_v2 / --v1-checkpoint first)")
            m.magnitude.requires_grad_(True)
            continue
        for name, p in m.named_parameters(recurse=False):
            p.requires_grad_(name != "weight" or not bool(m.frozen))
            if name == "lut":
                p.requires_grad_(m.spec.learnable_lut)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_q_all(model: nn.Module) -> int:
    """``freeze_Q`` on every LUT layer; returns how many were frozen."""
    layers = lut_layers(model)
    for m in layers.values():
        m.freeze_q()
    return len(layers)


def dequantize_lm(model: nn.Module) -> int:
    """Replace every LUT layer by a Linear with its dequantized weight (inference: the same outputs, float speed)."""
    layers = lut_layers(model)
    for name, m in layers.items():
        model.set_submodule(name, m.to_linear())
    return len(layers)


@contextmanager
def dequantized(model: nn.Module):
    """Inside the block every LUT layer is a Linear holding its dequantized weight (same outputs, float speed:
    generation does not rebuild ``lut[index] ⊙ (A @ B)`` per token); the LUT layers are put back after it."""
    layers = lut_layers(model)
    try:
        dequantize_lm(model)
        yield model
    finally:
        for name, m in layers.items():
            model.set_submodule(name, m)


def set_forward_mode(model: nn.Module, mode: str) -> None:
    for m in lut_layers(model).values():
        m.set_forward_mode(mode)


@torch.no_grad()
def bits_per_weight(model: nn.Module, scale_bits: int = 16, lut_bits: int = 16) -> dict:
    """True storage cost of the LUT layers: index bits plus table and scale overhead, per weight."""
    n = idx = extra = 0
    for m in lut_layers(model).values():
        numel = m.num_weights
        n += numel
        idx += numel * m.spec.bits
        scales = m.spec.rank * (m.out_features + m.in_features) + (m.spec.rank if m.spec.form == "v2" else 0)
        extra += m.lut.numel() * lut_bits + scales * scale_bits
    return {"weights": n, "index_bits": idx / max(n, 1), "overhead_bits": extra / max(n, 1),
            "bits_per_weight": (idx + extra) / max(n, 1)}  # fmt: skip
