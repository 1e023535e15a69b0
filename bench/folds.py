"""Run an example's recipe with its cross-validation folds at full size and print the aggregate: mean ± std and
the worst fold of every model and exported file, file-size ratios, and the recipe's criteria per fold.

    python bench/folds.py [NAME] [--workers N] [--json bench/results/folds.json]

The example's data is made first (its make_data.py, default size); the run goes to runs/folds/<name>.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from qatkit.recipe import parse_recipe
from qatkit.runner.folds import run_folds

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", default="sign_keypoints")
    ap.add_argument("--workers", type=int, default=None, help="override cv.workers")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "folds")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    folder = ROOT / "examples" / args.name
    raw = yaml.safe_load((folder / "recipe.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / Path(raw["data"]["path"]).name
        subprocess.run([sys.executable, str(folder / "make_data.py"), "--out", str(data)], check=True)
        raw.update(base_dir=str(folder), data=dict(raw["data"], path=str(data)))
        if args.workers:
            raw["cv"] = dict(raw["cv"], workers=args.workers)
        rep = run_folds(parse_recipe(raw, args.name), args.out / args.name, progress=False, check=False)
    key = rep.task.primary
    print(f"\n== {args.name}: {len(rep.reports)} folds, {rep.seconds:.0f} s ({key}, %)")
    for name, e in rep.aggregate.items():
        m = e["metrics"].get(key)
        if m:
            size = f"{e['size_bytes'] / 1024:8.1f} KiB" if e.get("size_bytes") else ""
            parity = f"parity {e['parity_ok']}/{e['parity_of']}" if "parity_of" in e else ""
            print(f"  {name:<40} {100 * m['mean']:6.2f} ± {100 * m['std']:5.2f}  worst {100 * m['worst']:6.2f} "
                  f"({m['worst_fold']})  {size} {parity}")  # fmt: skip
    for v in rep.verdicts():
        print(f"  {v['fold']:<16} {v['criterion']:<16} {v['where']:<50} {v['value']:8.3f} <= {v['limit']:g}: "
              f"{'met' if v['passed'] else 'MISSED'}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep.to_dict(), indent=1))


if __name__ == "__main__":
    main()
