"""Probe qatkit with malformed recipes and corrupted checkpoints, and count what happens to each.

Recipes: every scalar field of a full recipe is replaced in turn by a quoted number, a bool, a negative, a huge
number, NaN, a list and a mapping. Each outcome is one of: refused naming the field (good), accepted unchanged
(the value is valid there), accepted but changed (a silent coercion: bad), or a raw error (bad).
Checkpoints: a real run's checkpoint gets random bit flips, truncations, NaN and dtype swaps (re-saved with a
valid content hash), and is loaded as ``qatkit export`` does. Outcomes: refused naming the file (good), loaded
with identical tensors (a harmless flip, e.g. in header padding), loaded different (bad) or a raw error (bad).

    python bench/probe_safety.py [--flips 100] [--json bench/results/probe_safety.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console

import qatkit
from qatkit.base.config import RecipeError
from qatkit.io.checkpoint import CheckpointError, check_state_fits, load_weights, save_weights
from qatkit.recipe import parse_recipe

FULL = {
    "name": "probe",
    "seed": 3,
    "data": {"name": "digits", "batch_size": 64, "val_fraction": 0.1, "num_workers": 0},
    "model": {"name": "mlp", "args": {"hidden": [16], "dropout": 0.1}},
    "fp32": {"train": {"epochs": 1, "max_steps": 2, "lr": 0.003, "grad_clip": 1.0, "early_stopping": {}}},
    "variants": [{"name": "a", "quant": {"preset": "int8", "rules": [{"match": "net.*", "weight": {"bits": 4}}]},
                  "ptq": {"calib_batches": 1}, "qat": {"epochs": 1, "max_steps": 2, "lr": 0.0005}}],
    "export": {"formats": [], "latency_batches": [1], "min_agreement": 0.99},
}  # fmt: skip
MUTATIONS = ["1e3", True, -1, 10**12, math.nan, [1], {"x": 1}]


def leaves(obj, path=()):
    """(path, value) of every scalar in a nested dict/list."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, (*path, i))
    else:
        yield path, obj


def with_value(obj, path, value):
    obj = json.loads(json.dumps(obj))
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


def dotted(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def read_back(recipe, path):
    cur = recipe
    for p in path:
        cur = cur[p] if isinstance(p, int) else getattr(cur, p) if not isinstance(cur, dict) else cur[p]
    return cur


def probe_recipes() -> Counter:
    out: Counter = Counter()
    for path, _ in leaves(FULL):
        for value in MUTATIONS:
            try:
                r = parse_recipe(with_value(FULL, path, value))
            except RecipeError as e:
                last = str(path[-1])
                out["refused naming the field" if last in str(e) else "refused, field not named"] += 1
                continue
            except Exception as e:  # noqa: BLE001
                out[f"raw {type(e).__name__}"] += 1
                continue
            out[accepted(read_back(r, path), value, path)] += 1
    return out


def accepted(got, value, path) -> str:
    """How an accepted value came through: unchanged, by one of the two documented widenings, or coerced."""
    if type(got) is type(value) and (got == value or (value != value and got != got)):
        return "accepted unchanged"
    if type(value) is int and type(got) is float and got == value:
        return "accepted: an integer where a number is asked for"
    if isinstance(value, str) and got == [value]:
        return "accepted: one pattern for a list of patterns"
    return f"COERCED {dotted(path)}={value!r}->{got!r}"


def probe_checkpoints(flips: int, seed: int) -> Counter:
    rng = random.Random(seed)
    out: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        quick = dict(FULL, variants=[dict(FULL["variants"][0], qat=None)])
        qatkit.run(quick, run, progress=False, console=Console(quiet=True))
        good = (run / "fp32.safetensors").read_bytes()
        ref = load_weights(run / "fp32.safetensors")
        cases: list[tuple[str, bytes]] = []
        for _ in range(flips):
            raw = bytearray(good)
            pos = rng.randrange(len(raw))
            raw[pos] ^= 1 << rng.randrange(8)
            cases.append(("bit flip", bytes(raw)))
        for _ in range(flips // 5):
            cases.append(("truncation", good[: rng.randrange(len(good))]))
        for name in ref:
            bad = {k: v.clone() for k, v in ref.items()}
            if bad[name].is_floating_point():
                bad[name].view(-1)[0] = math.nan
                cases.append(("NaN re-saved", _saved(Path(tmp), bad)))
            bad = dict(ref, **{name: ref[name].to(torch.int64 if ref[name].is_floating_point() else torch.float32)})
            cases.append(("dtype re-saved", _saved(Path(tmp), bad)))
        for kind, data in cases:
            path = Path(tmp) / "case.safetensors"
            path.write_bytes(data)
            try:
                got = load_weights(path, expect={"stage": "fp32"})
                check_state_fits(path, ref, got)
            except CheckpointError as e:
                out[f"{kind}: refused naming the file" if "case.safetensors" in str(e) else f"{kind}: unnamed"] += 1
                continue
            except Exception as e:  # noqa: BLE001
                out[f"{kind}: raw {type(e).__name__}"] += 1
                continue
            same = all(torch.equal(got[k], ref[k]) for k in ref)
            out[f"{kind}: loaded identical (harmless)" if same else f"{kind}: LOADED DIFFERENT"] += 1
    return out


def _saved(folder: Path, tensors: dict) -> bytes:
    path = save_weights(folder / "resaved.safetensors", tensors, {"stage": "fp32", "recipe": "probe"})
    return path.read_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flips", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {"recipes": probe_recipes(), "checkpoints": probe_checkpoints(args.flips, args.seed)}
    for part, counts in results.items():
        print(f"{part}: {sum(counts.values())} probes")
        for k, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"  {n:5d}  {k}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({k: dict(v) for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
