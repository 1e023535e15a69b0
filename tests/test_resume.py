"""Interrupted runs: SIGKILL or SIGINT mid-QAT, then ``--resume auto`` ends with the uninterrupted weights."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

RECIPE = {
    "name": "resume",
    "data": {"name": "digits", "batch_size": 8},
    "model": {"name": "mlp", "args": {"hidden": [128, 64]}},
    "fp32": {"train": {"epochs": 1, "lr": 0.003}},
    "variants": [
        {
            "name": "w8a8",
            "quant": {"preset": "int8"},
            "ptq": {"calib_batches": 2},
            "qat": {"epochs": 4, "lr": 0.0005, "schedule": "cosine", "checkpoint": {"every_steps": 40, "keep": 2}},
        }
    ],
    "export": {"formats": []},
}


def start(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qatkit", "run", str(recipe), "--out", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step_checkpoint(proc: subprocess.Popen, folder: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(folder.glob("step-*.safetensors")):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.01)
    pytest.fail("no step checkpoint appeared")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "w8a8_qat.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    recipe = folder / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    proc = start(recipe, folder / "out")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return recipe, final_weights(folder / "out")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["sigkill", "sigint", "sigterm"])
def test_interrupted_run_resumes_to_identical_weights(reference, tmp_path, sig):
    recipe, expected = reference
    out = tmp_path / "out"
    proc = start(recipe, out)
    wait_for_step_checkpoint(proc, out / "checkpoints" / "w8a8_qat")
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    if sig != signal.SIGKILL:
        assert code == 130
        err = proc.stderr.read()
        assert "interrupted at step" in err and "--resume auto" in err and "Traceback" not in err
    else:
        assert code == -signal.SIGKILL
    assert not (out / "w8a8_qat.safetensors").exists()
    resumed = start(recipe, out, "--resume", "auto")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    got = final_weights(out)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_resume_refuses_a_different_recipe_but_takes_a_new_lr(reference, tmp_path):
    recipe, _ = reference
    out = tmp_path / "out"
    proc = start(recipe, out)
    wait_for_step_checkpoint(proc, out / "checkpoints" / "w8a8_qat")
    proc.kill()
    proc.wait()
    changed = yaml.safe_load(recipe.read_text())
    changed["variants"][0]["qat"]["label_smoothing"] = 0.1
    other = tmp_path / "changed.yaml"
    other.write_text(yaml.safe_dump(changed))
    r = start(other, out, "--resume", "auto")
    assert r.wait(timeout=120) == 2
    err = r.stderr.read()
    assert (
        "made by a different recipe" in err and "variants[0].qat.label_smoothing: checkpoint 0.0 vs recipe 0.1" in err
    )
    assert "Traceback" not in err
    lower = yaml.safe_load(recipe.read_text())
    lower["variants"][0]["qat"]["lr"] = 0.00025  # what the divergence message tells a user to do
    other.write_text(yaml.safe_dump(lower))
    r = start(other, out, "--resume", "auto")
    assert r.wait(timeout=300) == 0, r.stderr.read()

    def epoch_lrs(folder):
        rows = (folder / "w8a8_qat_train.csv").read_text().splitlines()[1:]
        return [float(row.split(",")[2]) for row in rows if not row.startswith("0,")]

    # every epoch ended after the resume point: the cosine schedule continued from half the base LR
    ours, ref = epoch_lrs(out), epoch_lrs(recipe.parent / "out")
    assert len(ours) == len(ref) == 4
    assert ours == pytest.approx([0.5 * x for x in ref])
