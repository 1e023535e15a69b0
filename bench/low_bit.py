"""Low-bit QAT on the digits CNN with every layer quantized (weights 2-4 bits, activations 8 bits): uniform widths,
learned scales, distillation, progressive 8 -> 4 -> 2 and mixed precision at 3 bits per weight, all from one
float model and at the same budget of 20 QAT epochs.

    python bench/low_bit.py [--epochs 20] [--json bench/results/low_bit.json]

Every variant is one entry of a single recipe, so all start from the same float weights; numbers are test
accuracy from the run's report (runs/low_bit/report.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

import qatkit

ROOT = Path(__file__).resolve().parents[1]


def rules(bits: int, **weight) -> dict:
    """Every layer at ``bits``; at <= 3 bits the weights get the default learned (LSQ) scales from an MSE start."""
    return {"rules": [{"match": "*", "weight": {"bits": bits, **weight}, "activation": {}}]}


def minmax(bits: int) -> dict:
    """Fixed min-max scales (the default at 4 bits and more)."""
    return rules(bits, learnable=False, observer="minmax")


def recipe(epochs: int) -> dict:
    qat = {"epochs": epochs, "lr": 1e-3, "schedule": "cosine", "logging": {"tensorboard": False}}
    third = max(1, epochs // 3)
    prog = [dict(qat, name="q8", epochs=third, weight_bits=8), dict(qat, name="q4", epochs=third, weight_bits=4),
            dict(qat, name="q2", epochs=epochs - 2 * third)]  # fmt: skip
    return {
        "name": "low_bit", "seed": 0, "data": {"name": "digits", "batch_size": 64},
        "model": {"name": "cnn2d", "args": {"channels": [16, 32]}},
        "fp32": {"train": {"epochs": 30, "lr": 2e-3, "schedule": "cosine", "weight_decay": 1e-4,
                           "logging": {"tensorboard": False}}},
        "variants": [
            {"name": "w4a8", "quant": rules(4), "qat": qat},
            {"name": "w4a8-lsq", "quant": rules(4, learnable=True, observer="mse"), "qat": qat},
            {"name": "w3a8-minmax", "quant": minmax(3), "qat": qat},
            {"name": "w3a8", "quant": rules(3), "qat": qat},
            {"name": "w2a8-minmax", "quant": minmax(2), "qat": qat},
            {"name": "w2a8", "quant": rules(2), "qat": qat},
            {"name": "w2a8-distill", "quant": rules(2), "qat": dict(qat, distill={"weight": 0.7, "temperature": 3})},
            {"name": "w2a8-progressive", "quant": rules(2), "qat": prog},
            {"name": "mixed-3bit", "quant": rules(2), "qat": qat,
             "mixed_precision": {"budget_bits": 3.0, "candidates": [2, 3, 4, 8], "eval_rows": 512}},
        ],
        "export": {"formats": []},
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "low_bit")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = qatkit.run(recipe(args.epochs), args.out, console=Console(quiet=True), progress=False, overwrite=True)
    fp32 = report.find("fp32", "fp32", "pytorch").metrics["accuracy"]
    rows = {"fp32": {"accuracy": fp32}}
    print(f"digits CNN, every layer quantized, {args.epochs} QAT epochs; test accuracy %  (FP32 {100 * fp32:.2f})")
    for v in report.layers:
        ptq, qat = report.find(v, "ptq", "pytorch"), report.find(v, "qat", "pytorch")
        bits = report.sensitivity.get(v, {}).get("average_bits")
        rows[v] = {"ptq": ptq.metrics["accuracy"], "qat": qat.metrics["accuracy"], "average_bits": bits}
        extra = f"  ({bits:.2f} bits per weight: {report.sensitivity[v]['chosen']})" if bits else ""
        print(f"  {v:<18} PTQ {100 * ptq.metrics['accuracy']:6.2f}  QAT {100 * qat.metrics['accuracy']:6.2f}  "
              f"QAT - FP32 {100 * (qat.metrics['accuracy'] - fp32):+6.2f}{extra}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"epochs": args.epochs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
