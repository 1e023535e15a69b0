"""Every example under examples/ runs end to end at tiny size: its data maker, its own model by import path, its
recipe (epochs cut to one or two), every exported file run in its runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qatkit.export.formats import diagnosable
from qatkit.recipe import parse_recipe
from qatkit.runner.pipeline import run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = sorted(p.name for p in EXAMPLES.iterdir() if (p / "recipe.yaml").is_file())


def _tiny_stages(stages):
    """The recipe's training stages with one or two epochs each (everything else as written)."""
    if stages is None:
        return None
    if isinstance(stages, list):
        return [dict(s, epochs=min(s.get("epochs", 1), 1)) for s in stages]
    return dict(stages, epochs=min(stages.get("epochs", 2), 2))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_example_runs_end_to_end_at_tiny_size(name, tmp_path):
    folder = EXAMPLES / name
    data_file = yaml.safe_load((folder / "recipe.yaml").read_text())["data"]["path"]
    out_data = tmp_path / Path(data_file).name
    made = subprocess.run([sys.executable, str(folder / "make_data.py"), "--out", str(out_data), "--n", "160"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr
    r = yaml.safe_load((folder / "recipe.yaml").read_text())
    r["base_dir"] = str(folder)  # the model is imported from the example's folder, as `qatkit run` does
    r["data"] = dict(r["data"], path=str(out_data), num_workers=0, persistent_workers=False)
    r["data"].pop("prefetch_factor", None)
    r["fp32"]["train"] = _tiny_stages(r["fp32"]["train"])
    for v in r["variants"]:
        v["qat"] = _tiny_stages(v.get("qat"))
    r["export"] = dict(r["export"], latency_batches=[1], latency_seconds=0.02, allow_parity_failure=True)
    r.pop("cv", None)  # one run on the file's own split (folds: tests/test_folds.py)
    r.pop("criteria", None)  # one or two epochs cannot meet a full-size run's criteria
    recipe = parse_recipe(r, name)
    report = run(recipe, tmp_path / "out", progress=False)
    exported = [row for row in report.rows if row.runtime != "pytorch"]
    formats = {row.format for row in exported}
    assert formats == set(recipe.export.formats)
    for row in exported:
        assert row.metrics is not None and not row.parity.startswith("failed: export error"), (row.label, row.parity)
        assert row.latency_ms.get("1", 0) > 0
    assert (tmp_path / "out" / "report.md").is_file()
    # a file that does not agree exactly with its model is diagnosed layer by layer during verification
    exact = report.task.exact_agreement
    for row in exported:
        if row.format in diagnosable() and row.stage in ("ptq", "qat") and row.agreement != exact:
            assert "diagnose" in row.details and "not diagnosed" not in row.details["diagnose"], row.details
            file = Path(row.file)
            assert (tmp_path / "out" / "diagnose" / f"{file.stem}_{row.format}.md").is_file()
    assert not report.folding.get("left"), report.folding  # every BatchNorm in the examples folds
