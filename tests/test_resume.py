"""Interrupted runs: SIGKILL or SIGINT mid-QAT, then ``--resume auto`` ends with the uninterrupted weights; a
crash at any point resumes to run exactly the remaining steps, with every tensor and log row as uninterrupted."""

import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ONE_THREAD
from crash import Crash, record_steps
from qatkit import calibrate, prepare
from qatkit.components.datasets import load_digits
from qatkit.components.models import MLP
from qatkit.io.checkpoint import read_metadata
from qatkit.runner.stages import newest_checkpoint
from qatkit.train import TrainConfig, fit, make_loader
from qatkit.train.state import read_counters

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
            "qat": {
                "epochs": 4,
                "lr": 0.0005,
                "schedule": "cosine",
                "checkpoint": {"every_steps": 40, "keep": 2},
                "logging": {"step_csv": True},
            },
        }
    ],
    "export": {"formats": []},
}


def start(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A ``qatkit run`` process on one thread: runs compared bit for bit must not differ by MKL's threading."""
    cmd = [sys.executable, "-m", "qatkit", "run", str(recipe), "--out", str(out), "--no-progress", *extra]
    env = dict(os.environ, **ONE_THREAD)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


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
    ref = recipe.parent / "out"
    for rel in ("stages/w8a8_qat.safetensors", "checkpoints/w8a8_qat/last.safetensors",
                "checkpoints/w8a8_qat/best.safetensors"):  # fmt: skip
        assert_same_tensors(load_file(str(ref / rel)), load_file(str(out / rel)), rel)  # optimiser, RNG included
    for log in ("w8a8_qat_train.csv", "w8a8_qat_steps.csv"):  # no step logged twice or lost
        assert rows(ref / log) == rows(out / log), log


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


# ---- in-process crashes: the resumed run does exactly the steps after the checkpoint -------------------------
CASES = {  # name: (crash after this many steps, the step the newest checkpoint holds, settings, NaN at step)
    "before-the-first-step": (1, 0, {}, None),  # only the checkpoint written before the baseline validation
    "mid-epoch-observers-on": (23, 20, {}, None),
    "epoch-boundary": (18, 16, {}, None),
    "quant-phase-change": (23, 20, {"fake_quant_delay_steps": 20, "freeze_observers_after_steps": 21}, None),
    "rollback-after-resume": (21, 20, {"guards": {"nonfinite_skips": 1}}, 22),  # back to epoch 1's end, not 20
    # compile: true — the compiled step (recompiled as the quantizer switches flip) resumes just as exactly
    "compiled-phase-change": (
        23,
        20,
        {"compile": True, "fake_quant_delay_steps": 20, "freeze_observers_after_steps": 21},
        None,
    ),  # fmt: skip
    "compiled-rollback": (21, 20, {"compile": True, "guards": {"nonfinite_skips": 1}}, 22),
}


@pytest.fixture(scope="module")
def digits():
    return load_digits(0.15, 0)


@pytest.fixture(scope="module")
def qat_base(digits):
    """A W4A8 MLP with dropout (so the RNG matters), calibrated; its min-max weight observers stay on."""
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, hidden=[32], dropout=0.1)
    prepare(model, {"rules": [{"types": ["Linear"], "weight": {"bits": 4}, "activation": {}}], "outputs": "rules"})
    calibrate(model, make_loader(digits.train, 64, True), 2)
    assert all(bool(q.observer_on) for n, q in model.named_modules() if n.endswith("weight_quant"))
    return model


def nan_at(model, n: int) -> None:
    """The ``n``-th training forward from now on gives a NaN output (once)."""
    calls = [0]

    def hook(mod, args, out):
        calls[0] += mod.training
        return out * float("nan") if mod.training and calls[0] == n else None

    model.register_forward_hook(hook)


def train(base, digits, run_dir, settings, resume=None, nan=None):
    model = copy.deepcopy(base)
    if nan is not None:
        nan_at(model, nan)
    cfg = TrainConfig(epochs=3, lr=2e-3, schedule="cosine", checkpoint={"every_steps": 5, "keep": 2},
                      logging={"step_csv": True, "tensorboard": False}, **settings)  # fmt: skip
    result = fit(model, digits.train, digits.val, cfg, num_classes=10, batch_size=64, run_dir=run_dir, stage="q",
                 resume=resume, progress=False)  # fmt: skip
    assert cfg.compile == (result.compile is not None and result.compile["fallback"] is None)  # it did compile
    return model


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def counters(path: Path) -> dict:
    c = read_counters(path)
    return dict(c, history=[{k: v for k, v in h.items() if k != "seconds"} for h in c["history"]])


def assert_same_tensors(want: dict, got: dict, where: str) -> None:
    assert want.keys() == got.keys(), where
    bad = [k for k in want if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])]
    assert not bad, f"{where}: {bad[:5]}"


@pytest.mark.parametrize("case", list(CASES))
def test_a_crash_anywhere_resumes_with_exactly_the_remaining_steps(qat_base, digits, tmp_path, monkeypatch, case):
    crash_after, resume_step, settings, nan_step = CASES[case]
    torch.manual_seed(1)
    ref_steps = record_steps(monkeypatch)
    ref = train(qat_base, digits, tmp_path / "ref", settings, nan=nan_step)
    torch.manual_seed(1)
    record_steps(monkeypatch, crash_after)
    with pytest.raises(Crash):
        train(qat_base, digits, tmp_path / "run", settings, nan=nan_step)
    folder = tmp_path / "run" / "checkpoints" / "q"
    ckpt = newest_checkpoint(folder)
    assert read_counters(ckpt)["step"] == resume_step
    torch.manual_seed(99)  # the checkpoint's RNG state must take over
    steps = record_steps(monkeypatch)
    got = train(qat_base, digits, tmp_path / "run", settings, ckpt, nan_step and nan_step - resume_step)
    cut = [s for s, _ in ref_steps].index(resume_step) + 1 if resume_step else 0
    assert steps == ref_steps[cut:]  # the same step numbers with bit-identical losses, nothing redone or skipped
    state = ref.state_dict()
    assert any(k.endswith("weight_quant.observed_batches") for k in state)
    assert_same_tensors(state, got.state_dict(), "final model")
    for name in ("last", "best"):  # weights, quantizer buffers, optimiser, scheduler, RNG streams
        want, have = tmp_path / "ref" / "checkpoints" / "q" / f"{name}.safetensors", folder / f"{name}.safetensors"
        assert_same_tensors(load_file(str(want)), load_file(str(have)), name)
        assert counters(want) == counters(have), name
    for log in ("q_train.csv", "q_steps.csv"):
        assert rows(tmp_path / "ref" / log) == rows(tmp_path / "run" / log), log
    if nan_step:
        assert (
            "rolled back to step 16"
            in read_metadata(folder / "last.safetensors")["counters"]["guards"]["log"][0]["detail"]
        )
