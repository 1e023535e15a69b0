"""Peer comparison: qatkit PTQ/QAT against torchao QAT, torch.ao FX QAT and ONNX Runtime static PTQ.

For each data set the float model is trained once; every tool starts from the same (BatchNorm-folded) float
weights, QAT tools share one fine-tuning budget (qatkit.train.fit, same optimizer, LR, epochs, batch size).
Reports test accuracy / NLL, QAT train-step time over float (interleaved medians) and, for int8 ONNX files,
ONNX Runtime latency and file size. Run ``python bench/peers.py [--quick] [--json PATH]``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

import qatkit
from qat_overhead import Trainer, environment, ratio_spread, step_breakdown, time_steps
from qatkit.components.datasets import DataSplits, load_basic_motions, load_digits
from qatkit.components.models import MLP, CNN1d, CNN2d, TinyTransformer
from qatkit.export import verify
from qatkit.export.onnx import export_onnx, quiet
from qatkit.train import TrainConfig, evaluate, fit, make_loader
from qatkit.train.config import LoggingConfig
from qatkit.transform.fold import fold_batchnorm

BITS: dict[str, int] = {"W8A8": 8, "W4A8": 4, "W2A8": 2}
"""Weight bit widths compared; activations are 8-bit for every tool."""

QAT_TOOLS = ("qatkit QAT", "torchao QAT", "torch.ao FX QAT")
"""Tools that fine-tune with fake quantization (step time is measured for these)."""

OUT_Q = "qatkit PTQ inputs-only"
"""qatkit W8A8 PTQ quantizing layer inputs only (``outputs: rules`` with no ``output:``), qatkit's behaviour before
``outputs: where_needed``: the export-speed reference that shows what quantizing the outputs that feed float buys."""

Prepared = tuple[nn.Module, int, int | None]
"""What a tool hands back: the quantized model, how many layers it quantized, the epoch fit kept (None: no fit)."""

STEP_TARGET = 1.3
"""Bar: qatkit's W8A8 QAT step on the MLP at most this many times a float step."""


@dataclass
class Settings:
    """Training budget and measurement lengths; ``--quick`` shrinks them."""

    float_epochs_digits: int
    float_epochs_motions: int
    qat_epochs: int
    qat_lr: float
    calib_batches: int
    step_rounds: int
    step_warmup: int
    latency_seconds: float
    latency_rounds: int
    profile: tuple[int, int]


FULL = Settings(30, 60, 5, 1e-4, 8, 50, 10, 2.0, 10, (5, 10))
QUICK = Settings(5, 10, 1, 1e-4, 4, 10, 3, 0.3, 3, (0, 0))


@dataclass
class Case:
    """One data set with its model: how to build it, whether to fold BatchNorm, batch size, float budget."""

    key: str
    label: str
    load: Callable[[], DataSplits]
    build: Callable[[DataSplits], nn.Module]
    fold: bool
    batch_size: int
    motions: bool


CASES = [
    Case("digits_cnn2d", "digits CNN2d (BN folded)", load_digits, lambda d: CNN2d(d.input_shape, d.num_classes), True, 64, False),
    Case("digits_mlp", "digits MLP 64-256-128-10", load_digits, lambda d: MLP(d.input_shape, d.num_classes, hidden=[256, 128]), False, 64, False),
    Case("motions_cnn1d", "BasicMotions CNN1d (BN folded)", load_basic_motions, lambda d: CNN1d(d.input_shape, d.num_classes), True, 8, True),
    Case("motions_transformer", "BasicMotions TinyTransformer", load_basic_motions, lambda d: TinyTransformer(d.input_shape, d.num_classes), False, 8, True),
]  # fmt: skip


def qatkit_recipe(bits: int, outputs: str = "where_needed") -> dict[str, Any]:
    """Every Linear/Conv: per-channel ``bits``-bit weights, 8-bit per-tensor activations (qatkit's defaults), and
    8-bit outputs where a layer feeds float (pooling, the logits), as quantize_static does."""
    return {
        "rules": [
            {"types": ["Linear", "Conv1d", "Conv2d"], "weight": {"bits": bits, "granularity": "channel"}, "activation": {"bits": 8}}
        ],
        "outputs": outputs,
    }  # fmt: skip


def reason(e: BaseException) -> str:
    """One line naming the innermost cause of an exception."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:180]


def train_config(epochs: int, lr: float, schedule: str, weight_decay: float) -> TrainConfig:
    """A fit() stage without TensorBoard (nothing is written to disk)."""
    return TrainConfig(
        epochs=epochs, lr=lr, schedule=schedule, weight_decay=weight_decay, logging=LoggingConfig(tensorboard=False)
    )


def test_metrics(model: nn.Module, data: DataSplits) -> dict[str, float]:
    """Test accuracy and NLL of a PyTorch model (eval mode)."""
    m = evaluate(model.eval(), make_loader(data.test, 512, False), data.num_classes)
    return {"accuracy": 100 * m["accuracy"], "nll": m["loss"]}


def logits_metrics(logits: np.ndarray, data: DataSplits) -> dict[str, float]:
    """Test accuracy and NLL from logits computed elsewhere (ONNX Runtime)."""
    y = data.test.tensors[1]
    t = torch.from_numpy(logits)
    return {"accuracy": 100 * float((t.argmax(1) == y).float().mean()), "nll": float(F.cross_entropy(t, y))}


def count_layers(model: nn.Module) -> int:
    """Linear/Conv layers of the float model (the denominator of every tool's coverage)."""
    return sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in model.modules())


# ---- the tools -------------------------------------------------------------------------------------------


def run_qatkit(fp: nn.Module, data: DataSplits, case: Case, bits: int, s: Settings, qat: bool) -> Prepared:
    """qatkit prepare + calibrate, then (QAT) fit with the shared budget."""
    model = copy.deepcopy(fp)
    report = qatkit.prepare(model, qatkit_recipe(bits))
    qatkit.calibrate(model, make_loader(data.train, case.batch_size, False), s.calib_batches)
    best = shared_fit(model, data, case, s) if qat else None
    return model, len(report.quantized), best


def run_out_q(fp: nn.Module, data: DataSplits, case: Case, s: Settings) -> Prepared:
    """qatkit W8A8 PTQ quantizing layer inputs only (no output quantizers): the export-speed reference."""
    model = copy.deepcopy(fp)
    report = qatkit.prepare(model, qatkit_recipe(8, outputs="rules"))
    qatkit.calibrate(model, make_loader(data.train, case.batch_size, False), s.calib_batches)
    return model, len(report.quantized), None


def run_torchao(fp: nn.Module, data: DataSplits, case: Case, bits: int, s: Settings) -> Prepared:
    """torchao QATConfig prepare (int8 per-token asymmetric dynamic activations, per-channel symmetric weights)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    dtype = {8: torch.int8, 4: torch.int4, 2: torch.int2}[bits]
    model = copy.deepcopy(fp)
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(dtype, "per_channel", is_symmetric=True)
    with quiet("root", "torchao"):
        quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))
    n = sum(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules())
    return model, n, shared_fit(model, data, case, s)


def torch_ao_qconfig(bits: int):
    """torch.ao QConfig: 8-bit per-tensor affine activations (no reduce_range), per-channel symmetric weights."""
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.fake_quantize import FusedMovingAvgObsFakeQuantize
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    act = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8, reduce_range=False
    )
    weight = FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        quant_min=-(2 ** (bits - 1)),
        quant_max=2 ** (bits - 1) - 1,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
    )
    return QConfig(activation=act, weight=weight)


def run_torch_ao(fp: nn.Module, data: DataSplits, case: Case, bits: int, s: Settings) -> Prepared:
    """torch.ao FX: prepare_qat_fx with the x86 QAT mapping, global QConfig at ``bits``; observers off to test."""
    from torch.ao.quantization import disable_observer, get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    mapping = get_default_qat_qconfig_mapping("x86").set_global(torch_ao_qconfig(bits))
    example = data.train.tensors[0][: case.batch_size]
    with quiet("root", "torchao"):
        model = prepare_qat_fx(copy.deepcopy(fp).train(), mapping, (example,))
    n = sum(name.endswith("weight_fake_quant") for name, _ in model.named_modules())
    best = shared_fit(model, data, case, s)
    model.apply(disable_observer)
    return model, n, best


def shared_fit(model: nn.Module, data: DataSplits, case: Case, s: Settings) -> int:
    """The QAT budget every tool gets: qatkit.train.fit, AdamW, constant LR, same epochs/batch/seed.

    Returns the epoch fit kept (0 = the prepared, calibrated start).
    """
    torch.manual_seed(0)
    result = fit(model, data.train, data.val, train_config(s.qat_epochs, s.qat_lr, "constant", 0.0),
        num_classes=data.num_classes, batch_size=case.batch_size, seed=0, progress=False)  # fmt: skip
    return result.best_epoch


class Calib:
    """onnxruntime CalibrationDataReader over the same calibration batches qatkit uses."""

    def __init__(self, batches: list[np.ndarray], name: str) -> None:
        self.it = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next calibration feed, or None when done."""
        return next(self.it, None)


def run_ort_static(float_path: Path, out: Path, data: DataSplits, case: Case, s: Settings) -> Path:
    """onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 activations, min-max calibration."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    CalibrationDataReader.register(Calib)
    x = data.train.tensors[0].numpy()
    stop = min(len(x), s.calib_batches * case.batch_size)
    batches = [x[i : i + case.batch_size] for i in range(0, stop, case.batch_size)]
    with quiet("root", "torchao"):
        quantize_static(
            str(float_path),
            str(out),
            Calib(batches, "input"),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return out


def export_peer(model: nn.Module, tool: str, example: torch.Tensor, path: Path) -> Path:
    """Try to lower a peer's QAT model to int8 and export it with torch.onnx.export(dynamo=True)."""
    m = copy.deepcopy(model).eval()
    if tool == "torch.ao FX QAT":
        from torch.ao.quantization.quantize_fx import convert_fx

        with quiet("root", "torchao"):
            m = convert_fx(m)
    else:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        from torchao.quantization.qat import QATConfig

        with quiet("root", "torchao"):
            quantize_(m, QATConfig(Int8DynamicActivationInt8WeightConfig(), step="convert"))
    with quiet("root", "torchao"), torch.no_grad():
        torch.onnx.export(m, (example,), str(path), dynamo=True, external_data=False)
    return path


# ---- one data set ----------------------------------------------------------------------------------------


def attempt(record: dict[str, Any], fn: Callable[[], Any]) -> Any:
    """Run one peer step; on failure store a one-line reason in ``record['error']`` and return None."""
    try:
        return fn()
    except Exception as e:  # one broken peer must never kill the run
        record["error"] = reason(e)
        return None


def run_case(case: Case, s: Settings, workdir: Path, console: Console) -> dict[str, Any]:
    """Float training, every tool at every bit width, step timing, ONNX export and ORT latency for one case."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    data = case.load()
    fp = case.build(data)
    epochs = s.float_epochs_motions if case.motions else s.float_epochs_digits
    console.log(f"{case.label}: float training, {epochs} epochs")
    fit(fp, data.train, data.val, train_config(epochs, 2e-3, "cosine", 1e-4),
        num_classes=data.num_classes, batch_size=case.batch_size, seed=0, progress=False)  # fmt: skip
    folded = fold_batchnorm(fp) if case.fold else []
    fp.eval()
    layers = count_layers(fp)
    rows: list[dict[str, Any]] = [{"tool": "float", "bits": "fp32", "layers": f"0/{layers}", **test_metrics(fp, data)}]
    models: dict[tuple[str, str], nn.Module] = {}
    for bname, bits in BITS.items():
        for tool in ("qatkit PTQ", *QAT_TOOLS):
            console.log(f"{case.label}: {tool} {bname}")
            row: dict[str, Any] = {"tool": tool, "bits": bname}
            runners = {
                "qatkit PTQ": lambda b=bits: run_qatkit(fp, data, case, b, s, qat=False),
                "qatkit QAT": lambda b=bits: run_qatkit(fp, data, case, b, s, qat=True),
                "torchao QAT": lambda b=bits: run_torchao(fp, data, case, b, s),
                "torch.ao FX QAT": lambda b=bits: run_torch_ao(fp, data, case, b, s),
            }
            t = time.perf_counter()
            got = attempt(row, runners[tool])
            row["seconds"] = round(time.perf_counter() - t, 2)
            if got is not None:
                model, n, best = got
                models[(tool, bname)] = model
                row["layers"] = f"{n}/{layers}"
                if best is not None:
                    row["best_epoch"] = best
                row.update(attempt(row, lambda m=model: test_metrics(m, data)) or {})
            rows.append(row)

    # ONNX: the float file, qatkit's int8 exports, quantize_static, peers' exports where they work
    example = data.train.tensors[0][:64]
    sample = data.test.tensors[0].numpy()
    paths: dict[str, Path] = {"float": export_onnx(fp, example, workdir / f"{case.key}_float.onnx")}
    ort_row: dict[str, Any] = {"tool": "ORT quantize_static", "bits": "W8A8"}
    console.log(f"{case.label}: ONNX exports and quantize_static")
    got = attempt(ort_row, lambda: run_ort_static(paths["float"], workdir / f"{case.key}_ort.onnx", data, case, s))
    if got is not None:
        paths["ORT quantize_static"] = got
        ort_row.update(logits_metrics(verify.run(verify.session(got), sample), data))
        ort_row["layers"] = f"{onnx_quantized_weights(got)}/{layers}"
    rows.append(ort_row)
    out_row: dict[str, Any] = {"tool": OUT_Q, "bits": "W8A8"}
    got = attempt(out_row, lambda: run_out_q(fp, data, case, s))
    if got is not None:
        models[(OUT_Q, "W8A8")], out_row["layers"] = got[0], f"{got[1]}/{layers}"
        out_row.update(test_metrics(got[0], data))
    rows.append(out_row)
    for row in rows:
        if row["bits"] != "W8A8" or row["tool"] == "ORT quantize_static":
            continue
        key = (row["tool"], "W8A8")
        if key not in models:
            continue
        path = workdir / f"{case.key}_{row['tool'].replace(' ', '_')}.onnx"
        if row["tool"].startswith("qatkit"):
            done = attempt(row, lambda m=models[key], p=path: export_onnx(m.eval(), example, p))
        else:
            done = attempt(row, lambda m=models[key], t=row["tool"], p=path: export_peer(m, t, example, p))
            if done is None:
                row["onnx_error"] = row.pop("error")
        if done is not None:
            paths[row["tool"]] = done
            row["ort"] = logits_metrics(verify.run(verify.session(done), sample), data)
    onnx_info = {
        name: {"size": verify.file_size(p), "fused_int8_ops": verify.fused_int8_ops(p)} for name, p in paths.items()
    }
    console.log(f"{case.label}: ORT latency of {', '.join(paths)}")
    sessions = {name: verify.session(p, threads=1) for name, p in paths.items()}
    lat = verify.latencies(sessions, sample, [1, 64], seconds=s.latency_seconds, rounds=s.latency_rounds)
    for row in rows:
        name = "float" if row["tool"] == "float" else row["tool"]
        if name in paths and row["bits"] in ("fp32", "W8A8"):
            row["latency_ms"] = lat[name]
            row["size"] = onnx_info[name]["size"]
            row["fused_int8_ops"] = onnx_info[name]["fused_int8_ops"]

    # train-step time: float vs every QAT model, interleaved on the same batch
    console.log(f"{case.label}: step timing, {s.step_rounds} interleaved rounds")
    x, y = data.train.tensors[0][: case.batch_size], data.train.tensors[1][: case.batch_size]
    trainers = {"float": Trainer(copy.deepcopy(fp), x, y, F.cross_entropy)}
    for (tool, bname), model in models.items():
        if tool in QAT_TOOLS:
            trainers[f"{tool}|{bname}"] = Trainer(copy.deepcopy(model), x, y, F.cross_entropy)
    timing = time_steps(trainers, s.step_rounds, s.step_warmup)
    float_ms = 1000 * timing["float"]["median_s"]
    for row in rows:
        t = timing.get(f"{row['tool']}|{row['bits']}")
        if t is not None:
            row["step_ms"] = 1000 * t["median_s"]
            row["step_ratio"] = t["median_s"] / timing["float"]["median_s"]
            row["step_ratio_iqr"] = list(ratio_spread(t["samples"], timing["float"]["samples"]))
    breakdown = {}
    if case.key == "digits_mlp" and s.profile[0]:
        console.log(f"{case.label}: per-op profile of the W8A8 steps")
        names = ["float"] + [n for n in trainers if n.endswith("|W8A8")]
        breakdown = step_breakdown({n: trainers[n] for n in names}, *s.profile)
    return {
        "label": case.label,
        "folded_batchnorm": folded,
        "batch_size": case.batch_size,
        "float_epochs": epochs,
        "float_step_ms": float_ms,
        "data": data.info,
        "rows": rows,
        "breakdown": breakdown,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def onnx_quantized_weights(path: Path) -> int:
    """Weight initializers quantized to int8 in an ONNX file (what quantize_static covered)."""
    graph = onnx.load(str(path)).graph
    return sum(init.data_type == onnx.TensorProto.INT8 and len(init.dims) >= 2 for init in graph.initializer)


# ---- report ----------------------------------------------------------------------------------------------


def fmt(row: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
    """A formatted number from ``row`` or an empty cell."""
    v = row.get(key)
    return "" if v is None else format(v * scale, spec)


def note(row: dict[str, Any]) -> str:
    """Why a row lacks numbers, or what its ONNX file ran as."""
    if "error" in row:
        return f"[red]not supported:[/] {row['error'][:100]}"
    if "onnx_error" in row:
        return f"no ONNX export: {row['onnx_error'][:100]}"
    if row.get("fused_int8_ops"):
        return ", ".join(f"{k} x{v}" for k, v in row["fused_int8_ops"].items())
    if "fused_int8_ops" in row and row["tool"] != "float":
        return "ORT runs it in float"
    return ""


def summary_table(results: dict[str, dict[str, Any]]) -> Table:
    """The one table: every (data set, tool, bits) with accuracy, NLL, step ratio, ORT latency and size."""
    t = Table(title="qatkit vs peers (same float weights, same QAT budget); ratio = QAT step / float step")
    for col in ("data set", "tool", "bits", "layers q."):
        t.add_column(col)
    for col in ("test acc %", "test NLL", "step ratio", "ORT b1 ms", "ORT b64 ms", "size KiB"):
        t.add_column(col, justify="right")
    t.add_column("int8 kernels / note", overflow="fold", max_width=60)
    for r in results.values():
        order = {"fp32": 0, **{b: i + 1 for i, b in enumerate(BITS)}}
        rows = sorted(r["rows"], key=lambda row: order[row["bits"]])
        for i, row in enumerate(rows):
            lat = row.get("latency_ms", {})
            t.add_row(
                r["label"] if i == 0 else "",
                row["tool"],
                row["bits"],
                row.get("layers", ""),
                fmt(row, "accuracy", ".2f"),
                fmt(row, "nll", ".4f"),
                fmt(row, "step_ratio", ".2f"),
                f"{lat[1]:.4f}" if lat else "",
                f"{lat[64]:.4f}" if lat else "",
                fmt(row, "size", ".1f", 1 / 1024),
                note(row),
            )
        t.add_section()
    return t


def verdicts(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The brief's bar, checked per data set and bit width: accuracy, step-time overhead, int8 latency."""
    out = []
    for key, r in results.items():
        by = {(row["tool"], row["bits"]): row for row in r["rows"]}
        for bname in BITS:
            q = by.get(("qatkit QAT", bname), {})
            peers = [row for (tool, b), row in by.items() if b == bname and not tool.startswith("qatkit")]
            scored = [p for p in peers if "accuracy" in p]
            if "accuracy" in q and scored:
                best = max(scored, key=lambda p: p["accuracy"])
                gap = q["accuracy"] - best["accuracy"]
                out.append({"case": key, "bits": bname, "check": "QAT accuracy >= best peer",
                            "value": f"{q['accuracy']:.2f} vs {best['accuracy']:.2f} ({best['tool']}, "
                            f"{best.get('layers', '?')} layers; qatkit {q.get('layers', '?')})",
                            "met": gap >= -1e-4, "gap": gap})  # fmt: skip
            timed = [p for p in peers if "step_ratio" in p]
            if "step_ratio" in q and timed:
                low = min(timed, key=lambda p: p["step_ratio"])
                out.append({"case": key, "bits": bname, "check": "QAT step ratio <= lowest peer",
                            "value": f"{q['step_ratio']:.2f}x (IQR {q['step_ratio_iqr'][0]:.2f}-{q['step_ratio_iqr'][1]:.2f}) "
                            f"vs {low['step_ratio']:.2f}x (IQR {low['step_ratio_iqr'][0]:.2f}-{low['step_ratio_iqr'][1]:.2f}, {low['tool']})",
                            "met": q["step_ratio"] <= low["step_ratio"], "gap": q["step_ratio"] / low["step_ratio"]})  # fmt: skip
            if key == "digits_mlp" and bname == "W8A8" and "step_ratio" in q:
                out.append({"case": key, "bits": bname, "check": f"QAT step ratio <= {STEP_TARGET}x float",
                            "value": f"{q['step_ratio']:.2f}x", "met": q["step_ratio"] <= STEP_TARGET,
                            "gap": q["step_ratio"] / STEP_TARGET})  # fmt: skip
        ort = by.get(("ORT quantize_static", "W8A8"), {})
        for tool in ("qatkit PTQ", "qatkit QAT", OUT_Q):
            q = by.get((tool, "W8A8"), {})
            if "latency_ms" in q and "latency_ms" in ort:
                for b in (1, 64):
                    ratio = q["latency_ms"][b] / ort["latency_ms"][b]
                    out.append({"case": key, "bits": "W8A8", "check": f"{tool} ONNX latency b{b} <= quantize_static",
                                "value": f"{q['latency_ms'][b]:.4f} vs {ort['latency_ms'][b]:.4f} ms ({ratio:.2f}x)",
                                "met": ratio <= 1.0, "gap": ratio})  # fmt: skip
    return out


def breakdown_lines(r: dict[str, Any], top: int = 8) -> list[str]:
    """The ops that make each W8A8 QAT step slower than the float step (self CPU ms/step, torch.profiler)."""
    f = r["breakdown"]["float"]
    lines = [f"per-op profile, {r['label']}, W8A8 (self CPU ms per step; float total {sum(f.values()):.3f}):"]
    for name, ops in r["breakdown"].items():
        if name == "float":
            continue
        extra = sorted(ops, key=lambda k: ops[k] - f.get(k, 0.0), reverse=True)[:top]
        parts = ", ".join(f"{k} {ops[k] - f.get(k, 0.0):+.3f}" for k in extra)
        lines.append(f"  {name.split('|')[0]}: total {sum(ops.values()):.3f}; top extra: {parts}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run: few epochs, short timing, no profile")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write all results to this JSON file")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--cases", nargs="*", choices=[c.key for c in CASES], help="only these data sets")
    p.add_argument("--qat-epochs", type=int, help="every QAT tool's epochs (default 5; 1 with --quick)")
    p.add_argument("--qat-lr", type=float, help="every QAT tool's constant learning rate (default 1e-4)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every case in this process, print the table and the bar's verdicts, optionally write JSON."""
    args = parse_args(argv)
    s = QUICK if args.quick else FULL
    s = replace(s, qat_epochs=args.qat_epochs or s.qat_epochs, qat_lr=args.qat_lr or s.qat_lr)
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 200)
    env = environment(args.threads)
    import torchao

    env["torchao"] = torchao.__version__
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as d:
        for case in CASES:
            if args.cases and case.key not in args.cases:
                continue
            results[case.key] = run_case(case, s, Path(d), console)
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    env["load_average_end"] = os.getloadavg()[0]
    console.print(
        f"\n{env['date']} | {env['machine']} | torch {env['torch']} ({args.threads} threads) | torchao "
        f"{env['torchao']} | onnxruntime {env['onnxruntime']} (1 thread) | qatkit {env['git_commit']} | "
        f"{'quick' if args.quick else 'full'} run, {env['wall_s']} s"
    )
    console.print(
        f"Budget: float {s.float_epochs_digits} (digits) / {s.float_epochs_motions} (motions) epochs; every QAT tool "
        f"{s.qat_epochs} epochs AdamW lr {s.qat_lr} constant via qatkit.train.fit (best validation epoch kept, "
        f"epoch 0 = start); {s.calib_batches} calibration batches. Step ratio: median of {s.step_rounds} "
        "interleaved rounds on one batch. Latency: verify.latencies, 1 ORT thread, interleaved, W8A8 files only."
    )
    console.print(summary_table(results))
    checks = verdicts(results)
    for c in checks:
        mark = "[green]met[/]" if c["met"] else "[red]MISSED[/]"
        console.print(f"{mark}  {c['case']} {c['bits']}: {c['check']}: {c['value']}")
    for r in results.values():
        if r["breakdown"]:
            console.print("\n".join(breakdown_lines(r)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "settings": asdict(s), "results": results, "verdicts": checks}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
