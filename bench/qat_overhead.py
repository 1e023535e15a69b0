"""QAT overhead benchmark: what fake quantization costs in training, and what int8 export buys in inference.

Measures, in one process: train-step time and peak memory of QAT models relative to their float originals
(interleaved runs, medians), and ONNX Runtime latency / file size of the exported int8 model relative to the
float export. Run ``python bench/qat_overhead.py [--quick] [--json PATH]``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.profiler import ProfilerActivity, profile

import qatkit
from qatkit.components.datasets import load_digits
from qatkit.components.models import MLP
from qatkit.export import verify
from qatkit.export.onnx import export_onnx

W2A8: dict[str, Any] = {"rules": [{"types": ["Linear"], "weight": {"bits": 2}, "activation": {"bits": 8}}]}
"""2-bit per-channel weights, 8-bit activations: the low-bit rule from the brief."""

OUTPUT_Q8: dict[str, Any] = {
    "rules": [{"types": ["Linear"], "weight": {"bits": 8}, "activation": {"bits": 8}, "output": {"bits": 8}}]
}
"""W8A8 plus an 8-bit quantizer on every Linear's output: the Q node ONNX Runtime needs after a Linear whose
consumer is not quantized (GELU, the logits) before it will fuse it into an int8 kernel. Reference only."""

EXPORTS: dict[str, str | dict[str, Any]] = {"W8A8": "int8", "W8A8+out": OUTPUT_Q8}
"""Quantized exports compared with the float export: the int8 preset (targets apply) and the reference."""

STEP_TARGET = 1.3
MEM_TARGET = 1.5
LAT_TARGETS = {1: 0.5, 64: 0.3}
"""Targets: QAT step and peak memory vs float (block MLP), int8 vs float ORT latency per batch size."""

MEMORY_METHOD = (
    "torch.profiler(profile_memory=True): running sum of every CPU allocator alloc/free event inside one "
    "train step (grads cleared before), plus the bytes live at step start (params, buffers, AdamW state, batch)"
)


@dataclass
class Settings:
    """How long to measure; ``--quick`` shrinks every count.

    ``*_profile`` is (rounds, steps per round) of the per-op profile; (0, 0) skips it.
    """

    mlp_rounds: int
    block_rounds: int
    mlp_warmup: int
    block_warmup: int
    latency_seconds: float
    latency_rounds: int
    mlp_profile: tuple[int, int]
    block_profile: tuple[int, int]


FULL = Settings(
    mlp_rounds=1500,
    block_rounds=80,
    mlp_warmup=50,
    block_warmup=3,
    latency_seconds=3.0,
    latency_rounds=10,
    mlp_profile=(10, 10),
    block_profile=(4, 1),
)
QUICK = Settings(
    mlp_rounds=150,
    block_rounds=6,
    mlp_warmup=10,
    block_warmup=1,
    latency_seconds=0.6,
    latency_rounds=6,
    mlp_profile=(0, 0),
    block_profile=(0, 0),
)


@dataclass
class Case:
    """One float model with its training batch, calibration batches, ONNX sample and QAT recipes to compare."""

    key: str
    label: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    calib: list[torch.Tensor]
    sample: np.ndarray
    recipes: dict[str, str | dict[str, Any]]
    train_targets: bool


class Trainer:
    """A model, its AdamW optimizer and one fixed batch: ``step()`` is one full training step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Callable) -> None:
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.x, self.y, self.loss = x, y, loss

    def step(self) -> None:
        """Forward, loss, backward and optimizer update (gradients set to None first)."""
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model(self.x), self.y).backward()
        self.opt.step()


def make_cases(block_act: str) -> list[Case]:
    """The default digits MLP (real data, batch 64) and a transformer-FFN-sized MLP on 1024 token rows."""
    torch.manual_seed(0)
    digits = load_digits(val_fraction=0.0)
    xs, ys = digits.train.tensors
    mlp = MLP((1, 8, 8), 10, hidden=[256, 128])
    mlp_case = Case(
        key="mlp",
        label="MLP 64-256-128-10 (digits, batch 64)",
        model=mlp,
        x=xs[:64].contiguous(),
        y=ys[:64].contiguous(),
        loss=F.cross_entropy,
        calib=[xs[i : i + 64] for i in range(0, 8 * 64, 64)],
        sample=digits.test.tensors[0].numpy(),
        recipes={"W8A8": "int8", "W2A8": W2A8},
        train_targets=False,
    )
    act = nn.GELU() if block_act == "gelu" else nn.ReLU()
    block = nn.Sequential(nn.Linear(768, 3072), act, nn.Linear(3072, 768))
    tokens = torch.randn(1024, 768)
    block_case = Case(
        key="block",
        label=f"FFN 768-3072-768 {block_act.upper()} (1024 rows)",
        model=block,
        x=tokens,
        y=torch.randn(1024, 768),
        loss=F.mse_loss,
        calib=[torch.randn(1024, 768) for _ in range(4)],
        sample=torch.randn(256, 768).numpy(),
        recipes={"W8A8": "int8"},
        train_targets=True,
    )
    return [mlp_case, block_case]


def quantized_copy(case: Case, recipe: str | dict[str, Any]) -> nn.Module:
    """A prepared and calibrated copy of the case's float model (the float model is left untouched)."""
    model = copy.deepcopy(case.model)
    qatkit.prepare(model, recipe)
    qatkit.calibrate(model, case.calib, len(case.calib))
    return model


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh pages the kernel had to map in)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(trainers: dict[str, Trainer], rounds: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Median step time per trainer, measured interleaved with a rotating order so noise hits all alike.

    Round r runs every trainer once, starting at a different one each round (f, q / q, f / ...). Also
    returns each trainer's median minor page faults per step and the per-round times themselves.
    """
    names = list(trainers)
    for _ in range(warmup):
        for n in names:
            trainers[n].step()
    times: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                f0, t0 = minor_faults(), time.perf_counter()
                trainers[n].step()
                times[n].append(time.perf_counter() - t0)
                faults[n].append(minor_faults() - f0)
    finally:
        gc.enable()
    return {
        n: {"median_s": statistics.median(times[n]), "faults": statistics.median(faults[n]), "samples": times[n]}
        for n in names
    }


def ratio_spread(q: list[float], f: list[float]) -> tuple[float, float]:
    """25th and 75th percentile of the per-round ratios q/f (how noisy the median ratio is)."""
    ratios = sorted(a / b for a, b in zip(q, f, strict=True))
    quarts = statistics.quantiles(ratios, n=4)
    return quarts[0], quarts[2]


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence C++ log lines (Kineto start/stop notices) written straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def storage_bytes(tensors: list[torch.Tensor], exclude: set[int] | None = None) -> tuple[int, set[int]]:
    """Bytes of the distinct storages behind ``tensors`` (views counted once), and their addresses."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        if exclude is None or s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values()), set(seen)


def live_state(tr: Trainer) -> list[torch.Tensor]:
    """Tensors alive across steps: parameters, buffers, optimizer state and the batch."""
    opt_state = [v for st in tr.opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return [*tr.model.parameters(), *tr.model.buffers(), *opt_state, tr.x, tr.y]


def step_memory(tr: Trainer) -> dict[str, int | bool]:
    """Peak live CPU bytes during one train step (profiler), and an independent saved-tensor estimate.

    Profiler: gradients are freed before profiling so every free in the step belongs to an allocation the
    profiler saw; peak = bytes live at start + max running sum of alloc/free events. ``closed`` checks that
    the events net out to exactly the new gradients. Cross-check: bytes live at start + one gradient per
    parameter + tensors autograd saves for backward (saved_tensors_hooks).
    """
    tr.opt.zero_grad(set_to_none=True)
    gc.collect()
    baseline, base_ptrs = storage_bytes(live_state(tr))
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tr.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)

    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    tr.opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = tr.loss(tr.model(tr.x), tr.y)
    saved_bytes, _ = storage_bytes(saved, exclude=base_ptrs)
    grad_bytes = sum(p.numel() * p.element_size() for p in tr.model.parameters() if p.requires_grad)
    del loss
    return {
        "baseline": baseline,
        "peak": baseline + peak,
        "estimate": baseline + grad_bytes + saved_bytes,
        "events": len(events),
        "closed": live == grad_bytes,
    }


def step_breakdown(trainers: dict[str, Trainer], rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Self CPU milliseconds per train step for each op, per trainer, from torch.profiler.

    Trainers take turns: each round profiles ``steps`` steps of each, so load changes hit all alike.
    """
    total: dict[str, dict[str, float]] = {n: {} for n in trainers}
    for _ in range(rounds):
        for name, tr in trainers.items():
            with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    tr.step()
            for e in prof.key_averages():
                ms = e.self_cpu_time_total / 1000.0 / (steps * rounds)
                total[name][e.key] = total[name].get(e.key, 0.0) + ms
    return total


def onnx_compare(case: Case, workdir: Path, s: Settings) -> dict[str, Any]:
    """Export the float model and each ``EXPORTS`` recipe; compare file size, fused int8 kernels, ORT latency.

    Each quantized file is also checked against the PyTorch fake-quantized model it came from (max abs error).
    """
    example = case.x[:64]
    paths = {"float": export_onnx(case.model, example, workdir / f"{case.key}_float.onnx")}
    files: dict[str, dict[str, Any]] = {}
    for name, recipe in EXPORTS.items():
        qmodel = quantized_copy(case, recipe).eval()
        paths[name] = export_onnx(qmodel, example, workdir / f"{case.key}_{name}.onnx")
        ort_out = verify.run(verify.session(paths[name], threads=1), case.sample[:64])
        files[name] = {
            "size": verify.file_size(paths[name]),
            "fused_int8_ops": verify.fused_int8_ops(paths[name]),
            "optimized_ops": dict(verify.optimized_op_counts(paths[name])),
            "ort_vs_torch_max_abs_err": float(
                np.abs(ort_out - qmodel(torch.from_numpy(case.sample[:64])).numpy()).max()
            ),
        }
    sessions = {name: verify.session(path, threads=1) for name, path in paths.items()}
    lat = verify.latencies(sessions, case.sample, [1, 64], seconds=s.latency_seconds, rounds=s.latency_rounds)
    return {"size_float": verify.file_size(paths["float"]), "files": files, "latency_ms": lat}


def run_case(case: Case, s: Settings, workdir: Path, console: Console) -> dict[str, Any]:
    """All measurements for one model: interleaved step timing, step memory, ORT comparison, breakdown."""
    block = case.key == "block"
    rounds, warmup = (s.block_rounds, s.block_warmup) if block else (s.mlp_rounds, s.mlp_warmup)
    profile_steps = s.block_profile if block else s.mlp_profile
    trainers = {"float": Trainer(copy.deepcopy(case.model), case.x, case.y, case.loss)}
    for name, recipe in case.recipes.items():
        trainers[name] = Trainer(quantized_copy(case, recipe), case.x, case.y, case.loss)
    console.log(f"{case.label}: timing {rounds} interleaved rounds of {', '.join(trainers)}")
    timing = time_steps(trainers, rounds, warmup)
    console.log(f"{case.label}: step memory")
    memory = {n: step_memory(tr) for n, tr in trainers.items()}
    breakdown = {}
    if profile_steps[0]:
        console.log(f"{case.label}: per-op profile")
        breakdown = step_breakdown(trainers, *profile_steps)
    console.log(f"{case.label}: ONNX export and ORT latency")
    with torch.no_grad():
        ort = onnx_compare(case, workdir, s)
    f = timing["float"]
    variants = {}
    for n in case.recipes:
        lo, hi = ratio_spread(timing[n]["samples"], f["samples"])
        variants[n] = {
            "step_ms": 1000 * timing[n]["median_s"],
            "step_ratio": timing[n]["median_s"] / f["median_s"],
            "step_ratio_iqr": [lo, hi],
            "faults_per_step": timing[n]["faults"],
            "memory": memory[n],
            "memory_ratio": memory[n]["peak"] / memory["float"]["peak"],
        }
    return {
        "label": case.label,
        "train_targets": case.train_targets,
        "rounds": rounds,
        "float": {"step_ms": 1000 * f["median_s"], "faults_per_step": f["faults"], "memory": memory["float"]},
        "variants": variants,
        "onnx": ort,
        "breakdown": breakdown,
    }


def status(value: float, target: float | None) -> str:
    """Rich markup for a ratio against an upper-bound target."""
    if target is None:
        return "[dim]-[/]"
    return "[green]met[/]" if value <= target else f"[red]MISSED[/] by {value / target:.2f}x"


def mib(n: float) -> str:
    """Bytes as MiB with one decimal."""
    return f"{n / 2**20:.1f} MiB"


def summary_rows(r: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """Table rows for one model: (metric, float, QAT/int8, ratio, spread, target, status)."""
    targets = r["train_targets"]
    f = r["float"]
    for name, v in r["variants"].items():
        target = STEP_TARGET if targets else None
        lo, hi = v["step_ratio_iqr"]
        yield (
            f"train step, {name}",
            f"{f['step_ms']:.2f} ms",
            f"{v['step_ms']:.2f} ms",
            f"{v['step_ratio']:.2f}x",
            f"{lo:.2f}-{hi:.2f}",
            f"<= {target}x" if target else "-",
            status(v["step_ratio"], target),
        )
    for name, v in r["variants"].items():
        target = MEM_TARGET if targets else None
        yield (
            f"peak step memory, {name}",
            mib(f["memory"]["peak"]),
            mib(v["memory"]["peak"]),
            f"{v['memory_ratio']:.2f}x",
            "",
            f"<= {target}x" if target else "-",
            status(v["memory_ratio"], target),
        )
    o = r["onnx"]
    lat = o["latency_ms"]
    for name, file in o["files"].items():
        note = "" if EXPORTS[name] == "int8" else " (reference)"
        for b, target in LAT_TARGETS.items():
            ratio = lat[name][b] / lat["float"][b]
            yield (
                f"ORT latency {name}{note}, batch {b}",
                f"{1000 * lat['float'][b]:.1f} us",
                f"{1000 * lat[name][b]:.1f} us",
                f"{ratio:.2f}x",
                "",
                f"<= {target}x",
                status(ratio, target),
            )
        yield (
            f"ONNX file size {name}{note}",
            mib(o["size_float"]),
            mib(file["size"]),
            f"{file['size'] / o['size_float']:.2f}x",
            "",
            "-",
            status(0.0, None),
        )


def summary_table(results: dict[str, dict[str, Any]]) -> Table:
    """The one table of ratios (QAT or int8 over float, lower is better) with their targets."""
    t = Table(title="QAT overhead and int8 speed-up: ratio = QAT or int8 / float (lower is better)")
    t.add_column("model")
    t.add_column("metric")
    for col in ("float", "QAT / int8", "ratio", "ratio IQR", "target"):
        t.add_column(col, justify="right")
    t.add_column("status")
    for r in results.values():
        for i, row in enumerate(summary_rows(r)):
            t.add_row(r["label"] if i == 0 else "", *row)
        t.add_section()
    return t


def training_table(results: dict[str, dict[str, Any]]) -> Table:
    """Supporting training numbers: the memory cross-check and minor page faults per step."""
    t = Table(title="Training step details")
    t.add_column("model")
    t.add_column("variant")
    for col in ("step (median)", "live at start", "peak (profiler)", "saved+grads estimate", "page faults/step"):
        t.add_column(col, justify="right")
    for r in results.values():
        rows = [("float", r["float"])] + list(r["variants"].items())
        for i, (name, v) in enumerate(rows):
            m = v["memory"]
            t.add_row(
                r["label"] if i == 0 else "",
                name,
                f"{v['step_ms']:.2f} ms",
                mib(m["baseline"]),
                mib(m["peak"]),
                mib(m["estimate"]),
                f"{v['faults_per_step']:.0f}",
            )
        t.add_section()
    return t


def export_table(results: dict[str, dict[str, Any]]) -> Table:
    """Supporting export numbers: which int8 kernels ORT fused, the optimised graph, agreement with PyTorch."""
    t = Table(title="Export details (ORT graph after optimisation)")
    for col in ("model", "export", "fused int8 ops", "all ops after ORT optimisation", "max |ORT - torch|"):
        t.add_column(col)
    for r in results.values():
        for i, (name, f) in enumerate(r["onnx"]["files"].items()):
            fused = ", ".join(f"{k} x{c}" for k, c in f["fused_int8_ops"].items()) or "[red]none: runs in float[/]"
            ops = ", ".join(f"{k} x{c}" for k, c in sorted(f["optimized_ops"].items()))
            t.add_row(r["label"] if i == 0 else "", name, fused, ops, f"{f['ort_vs_torch_max_abs_err']:.1e}")
        t.add_section()
    return t


def breakdown_table(r: dict[str, Any], top: int = 12) -> Table:
    """Ops that account for the W8A8 step's extra time: self CPU ms per step, QAT vs float."""
    f, q = r["breakdown"]["float"], r["breakdown"]["W8A8"]
    t = Table(title=f"Where the W8A8 step's extra time goes: {r['label']} (torch.profiler, self CPU ms/step)")
    t.add_column("op")
    for col in ("float", "W8A8", "extra"):
        t.add_column(col, justify="right")
    for k in sorted(q, key=lambda k: q[k] - f.get(k, 0.0), reverse=True)[:top]:
        t.add_row(k, f"{f.get(k, 0.0):.3f}", f"{q[k]:.3f}", f"{q[k] - f.get(k, 0.0):+.3f}")
    t.add_section()
    t.add_row(
        "total (all ops)",
        f"{sum(f.values()):.3f}",
        f"{sum(q.values()):.3f}",
        f"{sum(q.values()) - sum(f.values()):+.3f}",
    )
    return t


def git_commit() -> str:
    """Short commit of the checkout this script lives in ("unknown" outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()}-core {platform.machine()} ({cpu})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "qatkit": qatkit.__version__,
        "git_commit": git_commit(),
        "torch_threads": threads,
        "ort_threads": 1,
        "load_average_start": os.getloadavg()[0],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run (about a minute): fewer repeats, no profile")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write all results to this JSON file")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads for training (default 2)")
    p.add_argument("--block-act", choices=["gelu", "relu"], default="gelu", help="FFN block activation")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure both models in this one process, print the tables, optionally write JSON."""
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 160)
    env = environment(args.threads)
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as d:
        for case in make_cases(args.block_act):
            results[case.key] = {"key": case.key, **run_case(case, settings, Path(d), console)}
    env["load_average_end"] = os.getloadavg()[0]
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    console.print(
        f"\n{env['date']} | {env['machine']} | torch {env['torch']} ({env['torch_threads']} threads) | "
        f"onnxruntime {env['onnxruntime']} ({env['ort_threads']} thread) | qatkit {env['git_commit']} | "
        f"{'quick' if args.quick else 'full'} run, {env['wall_s']} s | "
        f"load avg {env['load_average_start']:.2f} -> {env['load_average_end']:.2f}"
    )
    console.print(
        "Step time: median over interleaved rounds (rotating order), after warm-up; IQR = quartiles of per-round "
        "ratios. Latency: qatkit.export.verify.latencies (interleaved sessions, median of rounds)."
    )
    mems = [m for r in results.values() for m in [r["float"]["memory"], *(v["memory"] for v in r["variants"].values())]]
    closed = sum(m["closed"] for m in mems)
    console.print(
        f"Peak memory: {MEMORY_METHOD}. Accounting closes (events net to exactly the new gradients) in "
        f"{closed} of {len(mems)} runs."
    )
    console.print(summary_table(results))
    console.print(training_table(results))
    console.print(export_table(results))
    for r in results.values():
        if r["breakdown"]:
            console.print(breakdown_table(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"environment": env, "settings": asdict(settings), "results": results}, indent=2, default=str)
        )
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
