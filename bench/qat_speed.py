"""QAT step speed, eager and compiled: qatkit against torch.ao FX and torchao on real model shapes.

For each model (the digits MLP, a ResNet-18-style CNN, a ViT-Tiny-style transformer) one process builds a float
trainer and a W8A8 QAT trainer per tool, each eager and under ``torch.compile`` (inductor), and times one full
training step (zero_grad + forward + loss + backward + AdamW) interleaved in rotating order, after warm-up.
Reports per variant: layers quantized, Dynamo graphs and graph breaks (``torch._dynamo.explain``), the first
compiled step (compilation), median step time and its ratio to the float step in the same mode. Run
``python bench/qat_speed.py [--quick] [--models ...] [--json PATH]``; see bench/README.md ("QAT at float speed").
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import qatkit
from peers import quiet, reason, torch_ao_qconfig
from qat_overhead import Trainer, environment, ratio_spread, step_breakdown, time_steps
from qatkit.components.datasets import load_digits
from qatkit.components.imports import import_target
from qatkit.components.models import MLP
from qatkit.transform.fold import fold_batchnorm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

W8A8: dict[str, Any] = {
    "rules": [
        {"types": ["Linear", "Conv2d"], "weight": {"bits": 8, "granularity": "channel"}, "activation": {"bits": 8}}
    ],
    "outputs": "where_needed",
}
"""Every Linear/Conv2d: per-channel 8-bit weights (min-max tracked every step), 8-bit per-tensor inputs, and 8-bit
outputs where a layer feeds float, as ``qatkit run`` prepares a model after calibration."""

TARGETS = {"digits_mlp": 1.5, "resnet18": 1.1, "vit_tiny": 1.1}
"""Bars: qatkit's QAT step over the float step, in whichever mode (eager or compiled) qatkit is faster."""


@dataclass
class Settings:
    """Measurement lengths; ``--quick`` shrinks them."""

    rounds: int
    warmup: int
    profile: tuple[int, int]
    resnet_batch: int
    vit_batch: int


FULL = Settings(rounds=20, warmup=3, profile=(2, 3), resnet_batch=32, vit_batch=32)
QUICK = Settings(rounds=5, warmup=2, profile=(0, 0), resnet_batch=16, vit_batch=16)


@dataclass
class Case:
    """A float model (BatchNorm folded: every tool starts from the same weights), one batch and a loss."""

    key: str
    label: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor


def example(folder: str, cls: str) -> Callable[..., nn.Module]:
    """A model class from examples/ (the ResNet and ViT written there, as a user's own model would be)."""
    return import_target(f"model:{cls}", EXAMPLES / folder)


def make_cases(keys: list[str], s: Settings) -> list[Case]:
    """The models measured: real digits for the MLP, random 32x32 images for the CNN and the ViT."""
    torch.manual_seed(0)
    cases = []
    if "digits_mlp" in keys:
        xs, ys = load_digits(val_fraction=0.0).train.tensors
        mlp = MLP((1, 8, 8), 10, hidden=[256, 128])
        cases.append(Case("digits_mlp", "digits MLP 64-256-128-10, batch 64", mlp, xs[:64].contiguous(), ys[:64]))
    if "resnet18" in keys:
        net = example("resnet_cnn", "TinyResNet")(3, 10, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2))
        fold_batchnorm(net.eval())
        net.train()
        b = s.resnet_batch
        label = f"ResNet-18 layout (3x3 stem, BN folded), 32x32, batch {b}"
        cases.append(Case("resnet18", label, net, torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,))))
    if "vit_tiny" in keys:
        vit = example("tiny_vit", "TinyViT")(32, 4, 3, 10, dim=192, depth=6, heads=3, mlp_ratio=4.0)
        b = s.vit_batch
        label = f"ViT-Tiny widths (192, 3 heads, MLP 768), depth 6, 65 tokens, batch {b}"
        cases.append(Case("vit_tiny", label, vit, torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,))))
    return cases


# ---- the tools: each returns the QAT model and how many Linear/Conv layers it fake-quantizes -------------


def prep_qatkit(case: Case) -> tuple[nn.Module, int]:
    """qatkit prepare + calibrate on the case's batch (activation ranges then frozen, weights tracked)."""
    model = copy.deepcopy(case.model)
    report = qatkit.prepare(model, W8A8)
    qatkit.calibrate(model, [case.x], 1)
    return model, len(report.quantized)


def prep_torch_ao(case: Case) -> tuple[nn.Module, int]:
    """torch.ao FX ``prepare_qat_fx`` with the x86 QAT mapping (fused observer + fake-quantize modules)."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    mapping = get_default_qat_qconfig_mapping("x86").set_global(torch_ao_qconfig(8))
    with quiet("root", "torchao"):
        model = prepare_qat_fx(copy.deepcopy(case.model).train(), mapping, (case.x,))
    return model, sum(name.endswith("weight_fake_quant") for name, _ in model.named_modules())


def prep_torchao(case: Case) -> tuple[nn.Module, int]:
    """torchao ``QATConfig`` (int8 per-token dynamic activations, per-channel weights): Linear layers only."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    model = copy.deepcopy(case.model)
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    with quiet("root", "torchao"):
        quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))
    return model, sum(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules())


TOOLS: dict[str, Callable[[Case], tuple[nn.Module, int]]] = {
    "qatkit": prep_qatkit,
    "torch.ao FX": prep_torch_ao,
    "torchao": prep_torchao,
}


def count_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules())


def graphs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Dynamo graphs and graph breaks of one training forward (on a copy: observers update in forward)."""
    m = copy.deepcopy(model).train()
    torch._dynamo.reset()
    e = torch._dynamo.explain(m)(x)
    torch._dynamo.reset()
    return e.graph_count, e.graph_break_count


def build(
    case: Case, tools: list[str], modes: list[str], console: Console
) -> tuple[dict[str, Trainer], dict[str, dict[str, Any]]]:
    """Eager and compiled trainers for float and each tool; the first compiled step is timed (compilation)."""
    trainers: dict[str, Trainer] = {}
    info: dict[str, dict[str, Any]] = {}
    loss = F.cross_entropy
    models = {"float": (copy.deepcopy(case.model), count_layers(case.model))}
    for tool in tools:
        try:
            models[tool] = TOOLS[tool](case)
        except Exception as e:  # a peer that cannot prepare this model is reported, not fatal
            info[tool] = {"error": reason(e)}
            console.print(f"  {tool}: {reason(e)}")
    for name, (model, layers) in models.items():
        g, breaks = graphs(model, case.x)
        if "eager" in modes:
            trainers[f"{name} eager"] = Trainer(copy.deepcopy(model), case.x, case.y, loss)
        if "compiled" in modes:
            compiled = Trainer(copy.deepcopy(model), case.x, case.y, loss)
            compiled.model = torch.compile(compiled.model)
            t0 = time.perf_counter()
            try:
                compiled.step()
            except Exception as e:
                info[f"{name} compiled"] = {"error": reason(e)}
                console.print(f"  {name} compiled: {reason(e)}")
            else:
                trainers[f"{name} compiled"] = compiled
                info[f"{name} compiled"] = {"first_step_s": round(time.perf_counter() - t0, 1)}
        for mode in modes:
            info.setdefault(f"{name} {mode}", {}).update(layers=layers, graphs=g, breaks=breaks)
        first = info.get(f"{name} compiled", {}).get("first_step_s", "-")
        console.print(f"  {name}: {layers} layers, {g} graphs, {breaks} breaks, compile {first} s")
    return trainers, info


def run_case(case: Case, tools: list[str], modes: list[str], s: Settings, console: Console) -> dict[str, Any]:
    console.print(f"[bold]{case.label}[/]: {count_layers(case.model)} Linear/Conv layers")
    trainers, info = build(case, tools, modes, console)
    timed = time_steps(trainers, s.rounds, s.warmup)
    rows = {}
    for name, t in timed.items():
        tool, mode = name.rsplit(" ", 1)
        ref = timed.get(f"float {mode}")
        row = {**info[name], "step_ms": 1000 * t["median_s"]}
        if ref is not None:
            row["vs_float_same_mode"] = t["median_s"] / ref["median_s"]
            row["vs_float_iqr"] = ratio_spread(t["samples"], ref["samples"])
        if "float eager" in timed:
            row["vs_float_eager"] = t["median_s"] / timed["float eager"]["median_s"]
        rows[name] = row
    for name, row in info.items():
        rows.setdefault(name, row)
    result: dict[str, Any] = {"label": case.label, "variants": rows, "verdict": verdict(case.key, rows)}
    if s.profile[0]:
        picked = {n: trainers[n] for n in ("float eager", "qatkit eager", "float compiled", "qatkit compiled")
                  if n in trainers}  # fmt: skip
        result["profile_ms"] = top_ops(step_breakdown(picked, *s.profile))
    return result


def verdict(key: str, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """qatkit's ratio in the mode where its QAT step is fastest, against the bar."""
    modes = [m for m in ("eager", "compiled") if "vs_float_same_mode" in rows.get(f"qatkit {m}", {})]
    if not modes:
        return {"met": False, "why": "qatkit was not timed"}
    best = min(modes, key=lambda m: rows[f"qatkit {m}"]["step_ms"])
    ratio = rows[f"qatkit {best}"]["vs_float_same_mode"]
    return {"mode": best, "ratio": round(ratio, 3), "target": TARGETS[key], "met": ratio <= TARGETS[key]}


def top_ops(breakdown: dict[str, dict[str, float]], top: int = 10) -> dict[str, dict[str, float]]:
    """The ``top`` ops by self CPU time per step, per trainer (ms)."""
    return {n: dict(sorted(ops.items(), key=lambda kv: -kv[1])[:top]) for n, ops in breakdown.items()}


def table(results: dict[str, dict[str, Any]]) -> Table:
    t = Table(title="Train step (zero_grad + forward + loss + backward + AdamW), medians over interleaved rounds")
    for col in ("model", "variant", "layers", "graphs / breaks", "compile s", "step ms", "vs float (same mode)",
                "IQR", "vs float eager"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for key, r in results.items():
        for name, row in r["variants"].items():
            if "error" in row:
                t.add_row(key, name, "", "", "", row["error"][:60], "", "", "")
                continue
            iqr = row.get("vs_float_iqr")
            t.add_row(key, name, str(row.get("layers", "")), f"{row.get('graphs', '')} / {row.get('breaks', '')}",
                      str(row.get("first_step_s", "")), f"{row['step_ms']:.1f}",
                      f"{row.get('vs_float_same_mode', float('nan')):.2f}x",
                      f"{iqr[0]:.2f}-{iqr[1]:.2f}" if iqr else "", f"{row.get('vs_float_eager', float('nan')):.2f}x")  # fmt: skip
    return t


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run: fewer rounds, smaller batches, no profile")
    p.add_argument("--models", nargs="+", default=["digits_mlp", "resnet18", "vit_tiny"],
                   choices=["digits_mlp", "resnet18", "vit_tiny"])  # fmt: skip
    p.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS), help="QAT tools to compare")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write all results to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 200)
    env = environment(args.threads)
    env["qatkit_path"] = str(Path(qatkit.__file__).resolve().parent)  # PYTHONPATH may point at another checkout
    t0 = time.perf_counter()
    results = {c.key: run_case(c, args.tools, args.modes, s, console) for c in make_cases(args.models, s)}
    env.update(load_average_end=os.getloadavg()[0], wall_s=round(time.perf_counter() - t0, 1))
    console.print(f"\n{env['date']} | {env['machine']} | torch {env['torch']} ({args.threads} threads) | qatkit "
                  f"{env['git_commit']} | {'quick' if args.quick else 'full'} run, {env['wall_s']} s | load avg "
                  f"{env['load_average_start']:.2f} -> {env['load_average_end']:.2f}")  # fmt: skip
    console.print(table(results))
    for key, r in results.items():
        v = r["verdict"]
        if "ratio" in v:
            console.print(f"{key}: qatkit {v['mode']} {v['ratio']:.2f}x float (bar {v['target']}x): "
                          f"{'met' if v['met'] else 'MISSED'}")  # fmt: skip
        for name, ops in r.get("profile_ms", {}).items():
            console.print(f"  {name}: " + ", ".join(f"{k} {ms:.2f}" for k, ms in list(ops.items())[:6]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"environment": env, "settings": asdict(s), "results": results}
        args.json.write_text(json.dumps(out, indent=2, default=str))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
