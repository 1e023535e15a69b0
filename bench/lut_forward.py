"""LUTLinear forward modes on a SmolLM2-sized MLP layer (576 -> 1536, rank 32): time and peak memory per call.

"materialize" forms W = Q ⊙ (A @ B) (the training default), "batched" runs all ranks at once, "factored" goes
rank by rank and never forms the out × in scale matrix (what an inference device does). Median of interleaved
runs, one process, so the ratios are comparable.

    .venv/bin/python bench/lut_forward.py --json bench/results/lut_forward.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc

import torch
from torch import nn

from qatkit.nn.lut_linear import LUTLinear, LUTSpec
from qatkit.quant.lowrank import FORWARD_MODES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 1024])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    layer = LUTLinear.from_linear(nn.Linear(576, 1536, bias=False), LUTSpec(bits=2, rank=args.rank))
    layer.freeze_q()
    rows = []
    with torch.no_grad():
        for n in args.tokens:
            x = torch.randn(n, 576)
            ref = layer(x)
            times = {m: [] for m in FORWARD_MODES}
            for _ in range(args.repeats):
                for mode in FORWARD_MODES:
                    layer.set_forward_mode(mode)
                    t = time.perf_counter()
                    y = layer(x)
                    times[mode].append(time.perf_counter() - t)
                    assert torch.allclose(y, ref, rtol=1e-3, atol=1e-4), mode
            base = statistics.median(times["materialize"])
            for mode in FORWARD_MODES:
                layer.set_forward_mode(mode)
                tracemalloc.start()
                layer(x)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                med = statistics.median(times[mode])
                rows.append({"tokens": n, "mode": mode, "ms": 1000 * med, "vs_materialize": med / base,
                             "peak_python_bytes": peak})  # fmt: skip
                print(f"tokens {n:>5}  {mode:<12} {1000 * med:8.3f} ms  {med / base:5.2f}x materialize")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python bench/lut_forward.py", "rank": args.rank, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
