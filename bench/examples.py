"""Run the examples under examples/ at full size and print, per example, the float / PTQ / QAT / exported metric,
file-size and latency ratios of each integer file to its float file, agreement, BatchNorms left unfolded and the
quantized layers a runtime still runs in float.

    python bench/examples.py [NAME ...] [--formats onnx executorch ...] [--json bench/results/examples.json]

Each example's data is made first (its make_data.py, default size) in a temporary folder; a bundled recipe's
name (digits_mlp, the default run) runs that recipe; ``--formats`` replaces the recipes' export formats. The
run goes to runs/examples/<name>. Numbers are measured in this run (2-core CPU here; latency: 1 thread, see the reports).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from qatkit.cli.main import bundled_recipes
from qatkit.recipe import parse_recipe
from qatkit.runner.pipeline import run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, out_root: Path, formats: list[str] | None = None) -> dict:
    """Make the example's data, run its recipe unchanged (data path redirected; export formats replaced if
    given), and summarise the report."""
    folder = EXAMPLES / name
    bundled = not (folder / "recipe.yaml").is_file()
    raw = yaml.safe_load((bundled_recipes()[name] if bundled else folder / "recipe.yaml").read_text())
    if formats:
        raw["export"] = dict(raw.get("export", {}), formats=formats)
    with tempfile.TemporaryDirectory() as tmp:
        if not bundled:
            data = Path(tmp) / Path(raw["data"]["path"]).name
            subprocess.run([sys.executable, str(folder / "make_data.py"), "--out", str(data)], check=True)
            raw["base_dir"] = str(folder)
            raw["data"]["path"] = str(data)
        raw.pop("cv", None)  # one run on the file's own split (folds: bench/folds.py)
        recipe = parse_recipe(raw, name)
        t0 = time.perf_counter()
        report = run(recipe, out_root / name, progress=False, check=False)
        seconds = time.perf_counter() - t0
    task = report.task
    key = task.primary
    rows = []
    for r in report.rows:
        ref = report.float_reference(r)
        ratio = {b: ms / ref.latency_ms[b] for b, ms in r.latency_ms.items() if ref and ref.latency_ms.get(b)}
        rows.append({"row": f"{r.label} {r.runtime} {r.precision or ''}".strip(), key: (r.metrics or {}).get(key),
                     "size_ratio": r.size_bytes / ref.size_bytes if ref and r.size_bytes and ref.size_bytes else None,
                     "latency_ratio": ratio, "agreement": r.agreement, "parity": r.parity,
                     "float_layers": r.float_layers,
                     "integer_kernels": (r.details or {}).get("integer_kernels"), "details": r.details,
                     "size_bytes": r.size_bytes, "latency_ms": r.latency_ms})  # fmt: skip
    return {"example": name, "task": task.name, "metric": key, "agreement": task.agreement_header.removesuffix(" %"),
            "seconds": seconds, "rows": rows,
            "batchnorm_left": report.folding.get("left", {}), "warnings": report.warnings()}  # fmt: skip


def show(result: dict) -> None:
    print(f"\n== {result['example']} ({result['task']}, {result['metric']}; {result['seconds']:.0f} s)")
    for r in result["rows"]:
        value = "" if r[result["metric"]] is None else f"{100 * r[result['metric']]:.2f}"
        size = "" if r["size_ratio"] is None else f"size {r['size_ratio']:.2f}x"
        lat = " ".join(f"b{b} {x:.2f}x" for b, x in r["latency_ratio"].items())
        agree = "" if r["agreement"] is None else f"{result['agreement']} {100 * r['agreement']:.2f}%"
        print(f"  {r['row']:<40} {value:>7} {size:>12} {lat:<22} {agree:<13} {r['parity'] or ''}")
    for w in result["warnings"]:
        print(f"  warning: {w}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="examples to run (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "examples")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--formats", nargs="+", help="export these formats instead of each recipe's own")
    args = ap.parse_args()
    names = args.names or sorted(p.name for p in EXAMPLES.iterdir() if (p / "recipe.yaml").is_file())
    results = []
    for name in names:
        results.append(run_example(name, args.out, args.formats))
        show(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
