"""Low-bit QAT on the digits CNN with every layer quantized (weights 2-4 bits, activations 8 bits): uniform widths,
learned scales, asymmetric grids, distillation, progressive 8 -> 4 -> 2 and mixed precision at 3 bits per
weight, all from one float model per seed and at one budget of 20 QAT epochs.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/low_bit.py [--seeds 0 1 2 3 4] [--json bench/results/low_bit.json]

Every variant of a seed is one entry of a single recipe, so all start from the same float weights; numbers are
test accuracy from the run's report (runs/low_bit/seed<N>/report.md). The "float, same fine-tune" row trains the
float model itself with the low-bit budget (batch, LR, epochs, distillation): how much of a QAT result is further
training of the float model rather than recovery from quantization.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from rich.console import Console

import qatkit
from qatkit.runner.export_run import load_run
from qatkit.train import TrainConfig, fit, make_loader, predict

ROOT = Path(__file__).resolve().parents[1]
KD = {"weight": 0.5, "temperature": 2.0}
MIXED = {"budget_bits": 3.0, "candidates": [2, 3, 4, 8], "eval_rows": 512}


def rules(bits: int, **weight) -> dict:
    """Every layer at ``bits``; at <= 3 bits the weights get the default learned (LSQ) scales from an MSE start."""
    return {"rules": [{"match": "*", "weight": {"bits": bits, **weight}, "activation": {}}]}


def minmax(bits: int) -> dict:
    """Fixed min-max scales (the default at 4 bits and more)."""
    return rules(bits, learnable=False, observer="minmax")


def plain_qat(epochs: int) -> dict:
    """The float training's batch (64), lr 1e-3 cosine, no teacher."""
    return {"epochs": epochs, "lr": 1e-3, "schedule": "cosine", "logging": {"tensorboard": False}}


def low_bit_qat(epochs: int, **kw) -> dict:
    """The low-bit fine-tune: batch 16, lr 3e-3 cosine, distillation from the float model (weight 0.5, T 2)."""
    return {"epochs": epochs, "lr": 3e-3, "schedule": "cosine", "batch_size": 16, "distill": KD,
            "logging": {"tensorboard": False}, **kw}  # fmt: skip


def low_bit_variants(epochs: int) -> list[dict]:
    """The two-convolution CNN: widths, scales, grids, distillation, progressive lowering and mixed precision."""
    qat, plain = low_bit_qat(epochs), plain_qat(epochs)
    third = max(1, epochs // 3)
    prog = [dict(qat, name="q8", epochs=third, weight_bits=8), dict(qat, name="q4", epochs=third, weight_bits=4),
            dict(qat, name="q2", epochs=epochs - 2 * third)]  # fmt: skip
    return [
        {"name": "w4a8", "quant": rules(4), "qat": qat},
        {"name": "w3a8", "quant": rules(3), "qat": qat},
        {"name": "w3a8-minmax", "quant": minmax(3), "qat": qat},
        {"name": "w2a8", "quant": rules(2), "qat": qat},
        {"name": "w2a8-asym", "quant": rules(2, symmetric=False), "qat": qat},
        {"name": "w2a8-minmax", "quant": minmax(2), "qat": qat},
        {"name": "w2a8-plain", "quant": rules(2), "qat": plain},
        {"name": "w2a8-progressive", "quant": rules(2), "qat": prog},
        {"name": "mixed-3bit", "quant": rules(2), "qat": qat, "mixed_precision": MIXED},
        # the plain fine-tune, where the widths still matter (the low-bit one brings 3 bits and more to the
        # float model's level, so the comparisons of widths drown in the seeds' spread there)
        {"name": "w4a8-plain", "quant": rules(4), "qat": plain},
        {"name": "w3a8-plain", "quant": rules(3), "qat": plain},
        {"name": "mixed-3bit-plain", "quant": rules(2), "qat": plain, "mixed_precision": MIXED},
    ]


def width_variants(epochs: int) -> list[dict]:
    """The three-convolution CNN: mixed precision against uniform 3 and 4 bits, with both fine-tunes."""
    qat, plain = low_bit_qat(epochs), plain_qat(epochs)
    return [
        {"name": "w4a8-plain", "quant": rules(4), "qat": plain},
        {"name": "w3a8-plain", "quant": rules(3), "qat": plain},
        {"name": "mixed-3bit-plain", "quant": rules(2), "qat": plain, "mixed_precision": MIXED},
        {"name": "w4a8", "quant": rules(4), "qat": qat},
        {"name": "w3a8", "quant": rules(3), "qat": qat},
        {"name": "mixed-3bit", "quant": rules(2), "qat": qat, "mixed_precision": MIXED},
    ]


def recipe(seed: int, channels: list[int], variants: list[dict]) -> dict:
    return {
        "name": "low_bit", "seed": seed, "data": {"name": "digits", "batch_size": 64},
        "model": {"name": "cnn2d", "args": {"channels": channels}},
        "fp32": {"train": {"epochs": 30, "lr": 2e-3, "schedule": "cosine", "weight_decay": 1e-4,
                           "logging": {"tensorboard": False}}},
        "variants": variants, "export": {"formats": []},
    }  # fmt: skip


def float_fine_tune(run_dir: Path, epochs: int) -> float:
    """Test accuracy of the run's float model after the low-bit fine-tune itself, without quantization."""
    _, data, task, model = load_run(run_dir)
    teacher = copy.deepcopy(model).eval()
    cfg = TrainConfig.model_validate({k: v for k, v in low_bit_qat(epochs).items() if k != "batch_size"})
    fit(model, data.train, data.val, cfg, task=task, batch_size=16, seed=0, teacher=teacher, progress=False)
    return task.metrics(*predict(model, make_loader(data.test, 256, False)))["accuracy"]


def run_seed(seed: int, epochs: int, out: Path, channels: list[int], variants: list[dict], reference: bool) -> dict:
    """One seed's recipe; with ``reference``, also the float model fine-tuned without quantization."""
    report = qatkit.run(recipe(seed, channels, variants), out, console=Console(quiet=True), progress=False,
                        overwrite=True)  # fmt: skip
    rows = {"fp32": {"qat": report.find("fp32", "fp32", "pytorch").metrics["accuracy"]}}
    if reference:
        rows["fp32-fine-tuned"] = {"qat": float_fine_tune(out, epochs)}
    for v in report.layers:
        ptq, qat = report.find(v, "ptq", "pytorch"), report.find(v, "qat", "pytorch")
        rows[v] = {"ptq": ptq.metrics["accuracy"], "qat": qat.metrics["accuracy"]}
        if v in report.sensitivity:
            rows[v] |= {
                "average_bits": report.sensitivity[v]["average_bits"],
                "chosen": report.sensitivity[v]["chosen"],
            }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "low_bit")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    e, out = args.epochs, args.out
    seeds = {s: run_seed(s, e, out / f"seed{s}", [16, 32], low_bit_variants(e), True) for s in args.seeds}
    deeper = {s: run_seed(s, e, out / f"deeper{s}", [16, 32, 64], width_variants(e), False) for s in args.seeds}
    print_table(f"digits CNN (16, 32), every layer quantized, {e} QAT epochs", seeds, args.seeds)
    print_table("digits CNN (16, 32, 64): mixed precision against uniform widths", deeper, args.seeds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"epochs": e, "seeds": seeds, "deeper": deeper}, indent=1))


def print_table(title: str, runs: dict, seeds: list[int]) -> None:
    """Test accuracy % of each seed's float model, then every variant's QAT accuracy minus it, and the mean."""
    print(f"{title}; test accuracy % minus each seed's FP32")
    print(f"  {'seed':<18}" + "".join(f"{s:>9}" for s in seeds) + "     mean")
    for v in runs[seeds[0]]:
        gaps = [100 * (runs[s][v]["qat"] - (0 if v == "fp32" else runs[s]["fp32"]["qat"])) for s in seeds]
        print(f"  {v:<18}" + "".join(f"{g:+9.2f}" for g in gaps) + f"{sum(gaps) / len(gaps):+9.2f}")


if __name__ == "__main__":
    main()
