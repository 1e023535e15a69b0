"""Checkpoints: atomic, safetensors-only; corrupt, truncated, foreign and pickled files are refused."""

import os
import pickle

import pytest
import torch

from qatkit.io.checkpoint import CheckpointError, load_weights, read_metadata, save_weights


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/qatkit_pwned",))


def test_round_trip_and_metadata(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    p = save_weights(tmp_path / "w.safetensors", sd, {"recipe": "r", "step": 3})
    out = load_weights(p, expect={"recipe": "r"})
    assert torch.equal(out["a"], sd["a"]) and torch.equal(out["b"], sd["b"])
    assert read_metadata(p)["step"] == 3
    assert [f.name for f in tmp_path.iterdir()] == ["w.safetensors"]  # no temp files left behind


def test_other_recipe_is_refused(tmp_path):
    p = save_weights(tmp_path / "w.safetensors", {"a": torch.ones(1)}, {"recipe": "r1"})
    with pytest.raises(CheckpointError, match="recipe='r1'.*recipe='r2'"):
        load_weights(p, expect={"recipe": "r2"})


def test_truncated_and_corrupt_are_refused(tmp_path):
    p = save_weights(tmp_path / "w.safetensors", {"a": torch.randn(100, 100)})
    data = p.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated|not a readable"):
        load_weights(tmp_path / "t.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_weights(tmp_path / "c.safetensors")


def test_pickle_is_refused_without_running_it(tmp_path):
    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"w": Boom()}))
    if os.path.exists("/tmp/qatkit_pwned"):
        os.remove("/tmp/qatkit_pwned")
    with pytest.raises(CheckpointError):
        load_weights(p)
    assert not os.path.exists("/tmp/qatkit_pwned")
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_weights(tmp_path / "plain.pt")


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a qatkit checkpoint"):
        load_weights(tmp_path / "x.safetensors")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = save_weights(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
    import qatkit.io.checkpoint as ck

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_weights(p, {"a": torch.ones(2)})
    monkeypatch.undo()
    assert torch.equal(load_weights(p)["a"], torch.zeros(2))
    assert [f.name for f in tmp_path.iterdir()] == ["w.safetensors"]
