"""lm-train under torchrun with FSDP2 (gloo, two CPU processes): it follows the one-process run, writes the
same files, and resumes from its own training states."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ONE_THREAD
from qatkit.io.checkpoint import read_metadata, save_weights


def lm_train(out, cache, model, procs: int, *extra: str, start=("--from-scratch",)) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m"]
    cmd = [*(launcher if procs > 1 else [sys.executable, "-m"]), "qatkit", "lm-train", "--cache", str(cache),
           "--model", str(model), *start, "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3",
           "--schedule", "constant", "--save-steps", "2", "--no-progress", "--out", str(out), *extra]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, **ONE_THREAD))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def steps(out) -> list[dict]:
    lines = (out / "lm_steps.csv").read_text().split()
    keys = lines[0].split(",")
    return [dict(zip(keys, map(float, row.split(",")), strict=True)) for row in lines[1:]]


@pytest.fixture(scope="module")
def runs(tiny_lm_dir, kd_cache_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    lm_train(folder / "one", kd_cache_dir, tiny_lm_dir, 1)
    lm_train(folder / "fsdp", kd_cache_dir, tiny_lm_dir, 2, "--fsdp")
    return folder


def test_fsdp_follows_one_process(runs):
    one, two = runs / "one", runs / "fsdp"
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["processes"] == 2 and s2["steps"] == s1["steps"] == 4
    # before the first update both compute the gradient of the same global batch: the same norm to rounding
    assert steps(two)[0]["grad_norm"] == pytest.approx(steps(one)[0]["grad_norm"], rel=1e-5)
    # later a rounding difference can flip a nearest-table index; stated tolerance: 5% of the eval KD loss
    assert s2["best_metrics"]["loss"] == pytest.approx(s1["best_metrics"]["loss"], rel=0.05)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()  # rank 0 wrote the full, unsharded LUT state
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k].float(), b[k].float(), atol=0.05), k


def test_fsdp_resumes_from_its_training_state(runs, tiny_lm_dir, kd_cache_dir):
    """Resumed from step 2 the run ends where the uninterrupted one did; resumed from the same file with one
    scale changed it does not, so the state really was loaded (a restart would ignore both)."""
    ckpt = runs / "fsdp" / "checkpoints" / "lm" / "step-00000002.safetensors"
    tensors = load_file(str(ckpt))  # full, unsharded tensors keyed like the model, frozen embeddings left out
    assert "model/model.embed_tokens.weight" not in tensors
    scale = "model/model.layers.0.mlp.up_proj.scale_a"
    assert tensors[scale].shape[0] == 64  # the whole layer's scales (64 output rows), not one rank's shard
    changed = runs / "changed.safetensors"
    tensors[scale] = tensors[scale] * 1.5
    meta = {k: v for k, v in read_metadata(ckpt).items() if k not in ("format", "sha256")}
    save_weights(changed, tensors, meta)
    expected = load_file(str(runs / "fsdp" / "model.safetensors"))
    for name, start in (("resumed", ckpt), ("changed", changed)):
        lm_train(runs / name, kd_cache_dir, tiny_lm_dir, 2, "--fsdp", "--resume", str(start))
        assert [r["step"] for r in steps(runs / name)] == [3.0, 4.0]  # only the steps after the checkpoint
    resumed = load_file(str(runs / "resumed" / "model.safetensors"))
    changed = load_file(str(runs / "changed" / "model.safetensors"))
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert not all(torch.equal(expected[k], changed[k]) for k in expected)
    shutil.rmtree(runs / "changed", ignore_errors=True)


def test_fsdp_trains_frozen_index_layers_that_hold_no_latent_weight(runs, tiny_lm_dir, kd_cache_dir):
    """V1 -> V2 under FSDP: the released (empty) latent weights shard, gather and save like the one-process run's."""
    start = ("--v1-checkpoint", str(runs / "one" / "model.safetensors"))
    lm_train(runs / "v2_one", kd_cache_dir, tiny_lm_dir, 1, start=start)
    lm_train(runs / "v2_fsdp", kd_cache_dir, tiny_lm_dir, 2, "--fsdp", start=start)
    s1, s2 = (json.loads((runs / d / "summary.json").read_text()) for d in ("v2_one", "v2_fsdp"))
    assert s2["processes"] == 2 and s2["best_metrics"]["loss"] == pytest.approx(s1["best_metrics"]["loss"], rel=0.05)
    a, b = (load_file(str(runs / d / "model.safetensors")) for d in ("v2_one", "v2_fsdp"))
    assert a.keys() == b.keys() and all(a[k].numel() == 0 for k in a if k.endswith(".weight"))
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k].float(), b[k].float(), atol=0.05), k
