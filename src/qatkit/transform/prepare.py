"""prepare(model, recipe): swap matching layers for quantized wrappers and report every layer's fate."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from qatkit.base.config import RecipeError
from qatkit.nn.fake_quantizer import FakeQuantizer, num_scales
from qatkit.nn.modules import QUANT_MODULES, REPORTED_TYPES, QuantModule, activation_module
from qatkit.quant.affine import fake_quantize
from qatkit.transform.graph import FusedActivation, NotTraceable, outputs_feeding_float
from qatkit.transform.rules import ActivationQuant, QuantRecipe, Rule, TensorQuant, parse_quant


@dataclass
class LayerRow:
    """One Linear/Conv layer: quantized or not, which rule decided, and its bit widths."""

    name: str
    type: str
    quantized: bool
    rule: str
    weight: str = "float"
    activation: str = "float"
    params: int = 0
    output: str = "float"


@dataclass
class LayerReport:
    """Every Linear/Conv layer in the model with its fate, plus totals that prove quantization is on."""

    rows: list[LayerRow] = field(default_factory=list)
    fused_relus: dict[str, str] = field(default_factory=dict)
    """{layer: ReLU / ReLU6 / Hardtanh module} absorbed by ``outputs: where_needed`` (replaced by Identity; the
    output is quantized after the activation)."""
    fused_bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    """{layer: (min, max)} of every activation absorbed (modules as in ``fused_relus``, and function calls such as
    ``F.relu6``, which stay in the model); (0, inf) is a ReLU."""
    notes: list[str] = field(default_factory=list)
    """What the planner could not do as asked (e.g. ``where_needed`` on a model torch.fx cannot trace)."""

    @property
    def quantized(self) -> list[LayerRow]:
        return [r for r in self.rows if r.quantized]

    @property
    def skipped(self) -> list[LayerRow]:
        return [r for r in self.rows if not r.quantized]

    def summary(self) -> str:
        qp = sum(r.params for r in self.quantized)
        tp = sum(r.params for r in self.rows) or 1
        return (
            f"{len(self.quantized)} of {len(self.rows)} layers quantized "
            f"({qp:,} of {tp:,} layer parameters, {100 * qp / tp:.1f}%); {len(self.skipped)} left in float"
        )

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "layers": [asdict(r) for r in self.rows], "notes": list(self.notes)}

    def to_markdown(self) -> str:
        return layers_markdown(self.to_dict()["layers"])

    def rich_table(self):
        from rich.table import Table

        t = Table(title="Layer report: " + self.summary())
        for col in LAYER_COLUMNS:
            t.add_column(col)
        for r in self.to_dict()["layers"]:
            t.add_row(*_layer_cells(r, "[green]yes[/]", "[dim]no[/]"))
        return t


LAYER_COLUMNS = ("layer", "type", "quantized", "weight", "input", "output", "params", "decided by")


def _layer_cells(r: dict, yes: str = "yes", no: str = "no") -> list[str]:
    quantized = yes if r["quantized"] else no
    return [r["name"], r["type"], quantized, r["weight"], r["activation"], r["output"], f"{r['params']:,}", r["rule"]]


def layers_markdown(rows: list[dict]) -> str:
    """A markdown table of layer-report rows (as in ``LayerReport.to_dict()['layers']``)."""
    lines = ["| " + " | ".join(LAYER_COLUMNS) + " |", "|" + "---|" * len(LAYER_COLUMNS)]
    lines += ["| " + " | ".join(_layer_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def name_matches(name: str, patterns: list[str]) -> bool:
    """Glob on the qualified module name, or a full-match regular expression with a ``re:`` prefix."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def rule_matches(rule: Rule, name: str, module: nn.Module) -> bool:
    if type(module) not in QUANT_MODULES:
        return False
    if rule.types and type(module).__name__ not in rule.types:
        return False
    if rule.match and not name_matches(name, rule.match):
        return False
    return not name_matches(name, rule.exclude)


def _describe(spec_model) -> str:
    if not isinstance(spec_model, TensorQuant):  # None, or output: false
        return "float"
    s = spec_model
    kind = "int" if s.signed else "uint"
    gran = f"group{s.group_size}" if s.granularity == "group" else s.granularity
    extra = ", lsq" if s.learnable else ("" if s.observer == "minmax" else f", {s.observer}")
    return f"{kind}{s.bits} {gran}{extra}"


def _check_fits(name: str, label: str, rule: Rule, module: nn.Module) -> None:
    """Fail before any layer is swapped if a rule's settings cannot apply to this layer's weight."""
    try:
        if rule.weight is not None:
            num_scales(rule.weight.to_spec(), tuple(module.weight.shape))
        for t in (rule.activation, rule.output):
            if isinstance(t, TensorQuant):
                t.to_spec()
    except ValueError as e:
        raise RecipeError(f"layer {name!r} ({label}): {e}") from None


def plan(model: nn.Module, recipe: QuantRecipe | dict | str) -> tuple[LayerReport, dict[str, Rule]]:
    """Decide, without changing the model, which layers each rule quantizes; errors on dead rules."""
    recipe = parse_quant(recipe)
    rules = recipe.resolved_rules()
    decided: dict[str, Rule] = {}
    report = LayerReport()
    matched = [0] * len(rules)
    won = [0] * len(rules)
    for name, m in model.named_modules():
        if isinstance(m, QuantModule):
            raise RecipeError(
                f"model is already prepared (layer {name!r} is {type(m).__name__}); prepare a float model"
            )
        if not isinstance(m, REPORTED_TYPES):
            continue
        params = sum(p.numel() for p in m.parameters(recurse=False))
        winner = None
        for i, (_, rule) in enumerate(rules):
            if rule_matches(rule, name, m):
                matched[i] += 1
                if winner is None:
                    winner = i
        if winner is None:
            why = "no rule matches" if type(m) in QUANT_MODULES else f"no wrapper for {type(m).__name__}"
            report.rows.append(LayerRow(name, type(m).__name__, False, why, params=params))
            continue
        won[winner] += 1
        label, rule = rules[winner]
        tensors = (rule.weight, rule.activation, rule.output)
        if rule.quantize and any(isinstance(t, TensorQuant) for t in tensors):
            _check_fits(name, label, rule, m)
            decided[name] = rule
            w, a, o = (_describe(t) for t in tensors)
            report.rows.append(LayerRow(name, type(m).__name__, True, label, w, a, params, o))
        else:
            report.rows.append(LayerRow(name, type(m).__name__, False, f"{label} (kept float)", params=params))
    if recipe.outputs == "where_needed":
        fused = _add_needed_outputs(model, decided, report)
        report.fused_relus = {n: a.module for n, a in fused.items() if a.module is not None}
        report.fused_bounds = {n: a.bounds for n, a in fused.items()}
    for i, (label, rule) in enumerate(rules):
        if matched[i] == 0:
            names = [r.name for r in report.rows]
            shown = ", ".join(names[:12]) + (f" (+{len(names) - 12} more)" if len(names) > 12 else "")
            raise RecipeError(f"{label} ({rule.describe()}) matches no layer; layers are: {shown or 'none'}")
        if won[i] == 0 and not label.startswith("preset"):
            raise RecipeError(f"{label} ({rule.describe()}) only matches layers already taken by earlier rules")
    return report, decided


def _add_needed_outputs(model: nn.Module, decided: dict[str, Rule], report: LayerReport) -> dict[str, FusedActivation]:
    """``outputs: where_needed``: give an 8-bit output quantizer to decided layers whose output feeds float,
    except those whose rule says ``output: false``; a model torch.fx cannot trace keeps the rules' outputs, with
    a note in the report.

    Returns the activations to absorb: {layer: activation} where a ReLU / ReLU6 / Hardtanh alone follows such a
    layer."""
    rows = {r.name: r for r in report.rows}
    fused = {}
    with_input = {n for n, r in decided.items() if r.activation is not None}
    try:
        feeding_float = outputs_feeding_float(model, set(decided), with_input)
    except NotTraceable as e:
        report.notes.append(
            f"outputs: where_needed fell back to the rules' outputs: torch.fx cannot trace the model ({e.reason}); "
            "quantized layers whose output feeds float ops (pooling, residual adds, the logits) will run in float "
            "in ONNX Runtime"
        )
        return {}
    for name, act in sorted(feeding_float.items()):
        if decided[name].output is None:
            decided[name] = decided[name].model_copy(update={"output": ActivationQuant()})
            rows[name].output = _describe(decided[name].output) + (f" after {act.label}" if act else "")
            rows[name].rule += " + output (where_needed)"
            if act:
                fused[name] = act
    return fused


def prepare(model: nn.Module, recipe: QuantRecipe | dict | str) -> LayerReport:
    """Swap the layers the recipe selects for quantized wrappers, in place; return the layer report.

    ``recipe`` is a :class:`QuantRecipe`, its dict form, or a preset name such as ``"int8"``.
    """
    report, decided = plan(model, recipe)
    for name, rule in decided.items():
        if not name:
            raise RecipeError("the model itself is a single layer; wrap it in a container (e.g. nn.Sequential)")
        float_mod = model.get_submodule(name)
        specs = (
            t.to_spec() if isinstance(t, TensorQuant) else None for t in (rule.weight, rule.activation, rule.output)
        )
        wrapper = QUANT_MODULES[type(float_mod)].from_float(float_mod, *specs)
        model.set_submodule(name, wrapper)
    for name, bounds in report.fused_bounds.items():  # the activation now runs inside the layer, before its output
        module = report.fused_relus.get(name)  # quantizer; a function call (F.relu) stays: a second clamp is a no-op
        if module is not None:
            model.set_submodule(module, nn.Identity())
        wrapper = model.get_submodule(name)
        wrapper.fused_relu, wrapper.fused_bounds = module, bounds
    report.notes += disable_fused_fast_paths(model)
    return report


def disable_fused_fast_paths(model: nn.Module) -> list[str]:
    """Turn off PyTorch's fused inference kernel in encoder layers that hold quantized layers.

    In eval mode ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``) may run one fused kernel that reads
    ``linear1.weight``/``linear2.weight`` directly: the float weights, skipping fake quantization, so a quantized
    FFN would be evaluated in float and its export would fail. The layer decides with ``activation_relu_or_gelu``;
    clearing it keeps the ordinary path (same outputs in float)."""
    layers = [n or "(model)" for n, m in model.named_modules()
              if getattr(m, "activation_relu_or_gelu", False) and any(isinstance(c, QuantModule) for c in m.modules())]  # fmt: skip
    for name in layers:
        model.get_submodule("" if name == "(model)" else name).activation_relu_or_gelu = False
    if not layers:
        return []
    return [f"PyTorch's fused encoder-layer kernel (which reads the float weights and would skip fake quantization) "
            f"is turned off in {len(layers)} layer(s): {', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}"]  # fmt: skip


def unprepare(model: nn.Module) -> nn.Module:
    """Put the float layers (with their current weights) back in place of every wrapper."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantModule) and name:
            if m.fused_relu is not None:
                model.set_submodule(m.fused_relu, activation_module(m.fused_activation()))
            model.set_submodule(name, m.to_float())
    return model


@torch.no_grad()
def weight_errors(model: nn.Module) -> dict[str, float]:
    """Each quantized layer's weight quantization error: RMS of (fake-quantized - float weight) over the RMS
    of the weight, with the quantizer's scales as they stand (learned ones included; nothing is observed)."""
    out = {}
    for name, m in model.named_modules():
        fq = getattr(m, "weight_quant", None) if isinstance(m, QuantModule) else None
        if fq is None or not fq.quantizing:
            continue
        fq.sync_zero_point()
        w, s = m.weight.detach().float(), fq.spec
        q = fake_quantize(w, fq.scale.detach(), fq.zero_point, s.qmin, s.qmax, fq.ch_axis, fq.group_size)
        out[name] = float((q - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt().clamp_min(1e-30))
    return out


def quant_status(model: nn.Module) -> dict:
    """Counts that show whether fake quantization is really active: wrappers and switched-on quantizers."""
    wrappers = [m for m in model.modules() if isinstance(m, QuantModule)]
    qs = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    return {
        "wrappers": len(wrappers),
        "quantizers": len(qs),
        "fake_quant_on": sum(q.quantizing for q in qs),
        "observing": sum(q.observing for q in qs),
    }
