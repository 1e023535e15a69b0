"""The training engine: guards against collapse and NaN, exact resume, logging, schedules and options."""

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import TensorDataset

from qatkit import calibrate, prepare
from qatkit.components.datasets import load_digits
from qatkit.components.models import MLP
from qatkit.io.checkpoint import CheckpointError, read_metadata, save_weights
from qatkit.runner.stages import newest_checkpoint
from qatkit.train import TrainConfig, evaluate, fit, make_loader
from qatkit.train.config import CheckpointConfig, GuardConfig
from qatkit.train.guards import TrainingDiverged
from qatkit.train.state import load_training_state, save_training_state


@pytest.fixture(scope="module")
def digits():
    return load_digits(0.15, 0)


@pytest.fixture(scope="module")
def qat_start(digits):
    """A float-trained MLP, prepared W4A8 and calibrated: where a QAT fine-tune starts."""
    torch.manual_seed(0)
    model = MLP(digits.input_shape, 10, hidden=[64])
    fit(model, digits.train, digits.val, TrainConfig(epochs=8, lr=3e-3), num_classes=10, batch_size=32, progress=False)
    prepare(model, {"rules": [{"types": ["Linear"], "weight": {"bits": 4}, "activation": {}}], "outputs": "rules"})
    calibrate(model, make_loader(digits.train, 64, True), 4)
    return model


def val_acc(model, digits):
    return evaluate(model, make_loader(digits.val, 512, False), 10)["accuracy"]


def test_collapse_guard_seed_000(qat_start, digits, tmp_path):
    """Seed 000's collapse: QAT at a too-high LR with batch size 1. Without guards the validation accuracy
    collapses; with them the run rolls back, cuts the LR, gives up with a diagnosis and keeps the start."""
    start = 100 * val_acc(qat_start, digits)
    cfg = TrainConfig(epochs=4, lr=0.1, guards=GuardConfig(enabled=False))
    free = fit(copy.deepcopy(qat_start), digits.train, digits.val, cfg, num_classes=10, batch_size=1, progress=False)
    assert min(100 * h["val_accuracy"] for h in free.history[1:]) < start - 20
    assert free.interventions == []

    guarded_model = copy.deepcopy(qat_start)
    cfg = TrainConfig(epochs=4, lr=0.1)
    res = fit(guarded_model, digits.train, digits.val, cfg, num_classes=10, batch_size=1, run_dir=tmp_path,
              stage="qat", progress=False)  # fmt: skip
    rollbacks = [i for i in res.interventions if i["kind"] == "collapse-rollback"]
    lrs = [v for i in rollbacks for v in (i["lr_before"], i["lr_after"])]
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])  # each rollback halves the LR again
    assert "fell" in rollbacks[0]["detail"] and rollbacks[0]["metric_after"] == pytest.approx(start)
    # the last epoch either trains at a stable LR or the guard says it gave up (at batch size 1 and LR 0.0125
    # which of the two happens depends on float summation order); it never ends collapsed in silence
    assert 100 * res.history[-1]["val_accuracy"] >= start - 5 or "gave up" in (res.gave_up or "")
    assert 100 * val_acc(guarded_model, digits) >= start - 5
    assert (tmp_path / "interventions.csv").read_text().count("collapse-rollback") == 3

    cfg = TrainConfig(epochs=3, lr=0.1, guards=GuardConfig(max_interventions=1))
    res = fit(copy.deepcopy(qat_start), digits.train, digits.val, cfg, num_classes=10, batch_size=1, progress=False)
    assert [i["kind"] for i in res.interventions] == ["collapse-rollback", "gave-up"]
    assert "gave up after 1 interventions" in res.gave_up and "lower the learning rate" in res.gave_up


def test_rollbacks_from_states_kept_on_disk_equal_rollbacks_from_memory(qat_start, digits, tmp_path):
    """``checkpoint.in_memory: false`` keeps no copies of model and optimizer: a collapse rollback and the final
    best weights are read back from the stage's checkpoints, with the same result as the in-memory copies."""
    runs = {}
    for in_memory in (True, False):
        model = copy.deepcopy(qat_start)
        cfg = TrainConfig(epochs=3, lr=0.1, checkpoint=CheckpointConfig(in_memory=in_memory),
                          guards=GuardConfig(max_interventions=2))  # fmt: skip
        torch.manual_seed(0)
        res = fit(model, digits.train, digits.val, cfg, num_classes=10, batch_size=1,
                  run_dir=tmp_path / str(in_memory), stage="qat", progress=False)  # fmt: skip
        runs[in_memory] = (res, model.state_dict())
    (mem, mem_sd), (disk, disk_sd) = runs[True], runs[False]
    assert [i["kind"] for i in mem.interventions][0] == "collapse-rollback"  # the case rolls back
    assert [i["kind"] for i in disk.interventions] == [i["kind"] for i in mem.interventions]
    assert [h["val_accuracy"] for h in disk.history] == [h["val_accuracy"] for h in mem.history]
    assert disk.best_epoch == mem.best_epoch and all(torch.equal(mem_sd[k], disk_sd[k]) for k in mem_sd)


def test_nan_mid_epoch_is_skipped_with_an_emergency_checkpoint(digits, tmp_path):
    torch.manual_seed(0)
    x, y = digits.train.tensors
    x = x.clone()
    x[100] = float("nan")  # one poisoned sample: its batch gives a NaN loss once per epoch
    model = MLP(digits.input_shape, 10, hidden=[64])
    res = fit(model, TensorDataset(x, y), digits.val, TrainConfig(epochs=3, lr=3e-3), num_classes=10, batch_size=32,
              run_dir=tmp_path, stage="float", progress=False)  # fmt: skip
    skips = [i for i in res.interventions if i["kind"] == "nonfinite-skip"]
    assert len(skips) == 3 and sum(h.get("skipped_steps", 0) for h in res.history) == 3
    emergency = sorted((tmp_path / "checkpoints" / "float").glob("emergency-step*.safetensors"))
    assert len(emergency) == 3
    first = MLP(digits.input_shape, 10, hidden=[64])
    counters = load_training_state(emergency[0], model=first, restore_rng=False)
    assert counters["step"] > 0 and all(torch.isfinite(p).all() for p in first.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert val_acc(model, digits) > 0.9  # nothing learned before (or after) the fault was lost


def test_repeated_nan_rolls_back_then_stops_with_a_clear_message(qat_start, digits, tmp_path):
    def poison(epoch, model):
        if epoch >= 1:
            with torch.no_grad():
                model.net[1].bias[0] = float("nan")

    cfg = TrainConfig(epochs=3, lr=1e-3, guards=GuardConfig(max_interventions=2))
    with pytest.raises(TrainingDiverged) as e:
        fit(copy.deepcopy(qat_start), digits.train, digits.val, cfg, num_classes=10, batch_size=64, run_dir=tmp_path,
            stage="qat", progress=False, on_epoch_start=poison)  # fmt: skip
    msg = str(e.value)
    assert "non-finite weights at the end of the epoch at step" in msg and "epoch 2" in msg and "lr 0.00025" in msg
    assert "after 2 rollbacks; resume from" in msg and "last.safetensors" in msg
    log = (tmp_path / "interventions.csv").read_text()
    assert log.count("nonfinite-rollback") == 2


def test_tensorboard_scalars_can_be_read_back(qat_start, digits, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(copy.deepcopy(qat_start), digits.train, digits.val, TrainConfig(epochs=2, lr=1e-4, grad_clip=1.0),
        num_classes=10, batch_size=64, run_dir=tmp_path, stage="qat", progress=False)  # fmt: skip
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "qat")).Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "epoch/val_accuracy", "epoch/val_loss",
                "quant/net.1.weight_quant/scale_mean", "quant/net.1.weight_quant/clipped_fraction",
                "quant/net.1.input_quant/scale_mean"):  # fmt: skip
        assert tag in tags, tag
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 2 * 16
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("quant/net.1.weight_quant/clipped_fraction"))


def test_resume_from_a_step_checkpoint_is_exact(qat_start, digits, tmp_path):
    cfg = TrainConfig(epochs=3, lr=5e-4, schedule="cosine", checkpoint=CheckpointConfig(every_steps=10, keep=2))
    a = copy.deepcopy(qat_start)
    fit(a, digits.train, digits.val, cfg, num_classes=10, batch_size=64, run_dir=tmp_path / "a", stage="qat",
        progress=False)  # fmt: skip
    steps = sorted((tmp_path / "a" / "checkpoints" / "qat").glob("step-*.safetensors"))
    assert [p.name for p in steps] == ["step-00000030.safetensors", "step-00000040.safetensors"]  # keep=2
    b = copy.deepcopy(qat_start)
    fit(b, digits.train, digits.val, cfg, num_classes=10, batch_size=64, run_dir=tmp_path / "b", stage="qat",
        resume=steps[0], progress=False)  # fmt: skip
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_trainable_only_states_leave_frozen_parameters_out_and_resume_exactly(qat_start, digits, tmp_path):
    """``checkpoint.trainable_only``: the frozen first layer is not in the files; a resume into a model rebuilt
    the same way ends where the uninterrupted run ended (and away from the checkpoint: it did not restart)."""
    base = copy.deepcopy(qat_start)
    base.net[1].weight.requires_grad_(False)
    cfg = TrainConfig(epochs=2, lr=5e-4, checkpoint=CheckpointConfig(every_steps=10, keep=5, trainable_only=True))
    a = copy.deepcopy(base)
    fit(a, digits.train, digits.val, cfg, num_classes=10, batch_size=64, run_dir=tmp_path / "a", stage="qat",
        progress=False)  # fmt: skip
    mid = tmp_path / "a" / "checkpoints" / "qat" / "step-00000010.safetensors"
    with safe_open(mid, "pt") as f:
        keys = set(f.keys())
    assert "model/net.1.weight" not in keys and "model/net.1.bias" in keys
    b = copy.deepcopy(base)
    with torch.no_grad():  # trainable weights unlike the start: a run that ignored the checkpoint would differ
        b.net[3].weight.add_(torch.randn_like(b.net[3].weight))
    fit(b, digits.train, digits.val, cfg, num_classes=10, batch_size=64, run_dir=tmp_path / "b", stage="qat",
        resume=mid, progress=False)  # fmt: skip
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    with pytest.raises(CheckpointError, match="different model"):  # a trainable parameter missing is refused
        c = copy.deepcopy(qat_start)
        load_training_state(mid, model=c)


def test_training_state_from_another_model_or_corrupt_is_refused(qat_start, tmp_path):
    model = copy.deepcopy(qat_start)
    opt = torch.optim.AdamW(model.parameters())
    path = save_training_state(tmp_path / "s.safetensors", model=model, optimizer=opt, fingerprint={"stage": "qat"})
    other = MLP((1, 8, 8), 10, hidden=[32])
    prepare(other, "int8")
    with pytest.raises(CheckpointError, match="different model|shape"):
        load_training_state(path, model=other)
    with pytest.raises(CheckpointError, match="stage='qat'.*stage='fp32'"):
        load_training_state(path, model=copy.deepcopy(qat_start), expect={"stage": "fp32"})
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError):
        load_training_state(tmp_path / "t.safetensors", model=copy.deepcopy(qat_start))


def test_gradient_accumulation_matches_the_large_batch(digits):
    """SGD without momentum: 2 micro-batches of 16 accumulate to the same step as one batch of 32."""
    torch.manual_seed(0)
    base = MLP(digits.input_shape, 10, hidden=[16])
    runs = []
    for bs, accum in ((32, 1), (16, 2)):
        m = copy.deepcopy(base)
        cfg = TrainConfig(epochs=1, lr=0.05, optimizer="sgd", momentum=0.0, grad_accum=accum, validation=False)
        small = TensorDataset(*(t[:256] for t in digits.train.tensors))
        fit(m, small, None, cfg, num_classes=10, batch_size=bs, progress=False)
        runs.append(m)
    for pa, pb in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_schedules_precision_delay_and_quantizer_lr(qat_start, digits):
    m = copy.deepcopy(qat_start)
    cfg = TrainConfig(epochs=3, lr=1e-3, schedule="plateau", plateau_patience=1, precision="bf16",
                      fake_quant_delay_steps=20, freeze_observers_after_steps=5)  # fmt: skip
    res = fit(m, digits.train, digits.val, cfg, num_classes=10, batch_size=64, progress=False)
    assert all(math.isfinite(h["train_loss"]) for h in res.history[1:])
    assert all(bool(q.fake_quant_on) for q in m.modules() if hasattr(q, "fake_quant_on"))
    assert not any(bool(q.observer_on) for q in m.modules() if hasattr(q, "observer_on"))
    step = TrainConfig(epochs=4, lr=1e-2, optimizer="sgd", schedule="step", step_epochs=2, gamma=0.1, validation=False)
    res = fit(copy.deepcopy(qat_start), digits.train, None, step, num_classes=10, batch_size=128, progress=False)
    assert [round(h["lr"], 6) for h in res.history] == [0.01, 0.001, 0.001, 0.0001]
    from qatkit.train.loop import param_groups

    assert len(param_groups(qat_start, 0.1, 1e-2)) == 1  # no learnable scales: one group
    lsq = MLP(digits.input_shape, 10, hidden=[16])
    prepare(lsq, {"rules": [{"types": ["Linear"], "weight": {"bits": 4, "learnable": True}}]})
    groups = param_groups(lsq, 0.1, 1e-2)
    assert groups[1] == {"params": [lsq.net[1].weight_quant.scale, lsq.net[3].weight_quant.scale],
                         "weight_decay": 0.0, "lr": 1e-2}  # fmt: skip
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        fit(m, digits.train, None, TrainConfig(epochs=1, precision="fp16"), num_classes=10, batch_size=64,
            progress=False)  # fmt: skip


def test_worker_processes_give_the_same_result(digits):
    from qatkit.train.loop import LoaderOptions

    results = []
    for opts in (LoaderOptions(), LoaderOptions(num_workers=2, persistent_workers=True, prefetch_factor=2)):
        torch.manual_seed(0)
        m = MLP(digits.input_shape, 10, hidden=[16])
        fit(m, digits.train, None, TrainConfig(epochs=2, validation=False), num_classes=10, batch_size=64,
            loader=opts, progress=False)  # fmt: skip
        results.append(m)
    for pa, pb in zip(results[0].parameters(), results[1].parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_wandb_without_the_package_is_a_clear_error(digits, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = TrainConfig(epochs=1, logging={"wandb": True})
    with pytest.raises(ValueError, match=r"pip install 'qatkit\[wandb\]'"):
        fit(MLP(digits.input_shape, 10, hidden=[8]), digits.train, None, cfg, num_classes=10, batch_size=64,
            run_dir=tmp_path, progress=False)  # fmt: skip


def test_resume_is_exact_with_dropout_and_a_short_accumulation_window(digits, tmp_path):
    """22 batches per epoch with grad_accum 3: the last window has one micro-batch and must still step."""
    torch.manual_seed(0)
    base = MLP(digits.input_shape, 10, hidden=[64], dropout=0.2)
    prepare(base, "int8")
    calibrate(base, make_loader(digits.train, 64, True), 2)
    cfg = TrainConfig(epochs=3, lr=1e-3, schedule="cosine", grad_accum=3,
                      checkpoint=CheckpointConfig(every_steps=5, keep=20))  # fmt: skip
    a = copy.deepcopy(base)
    res = fit(a, digits.train, digits.val, cfg, num_classes=10, batch_size=48, run_dir=tmp_path / "a", stage="q",
              progress=False)  # fmt: skip
    assert res.steps == 3 * 8 and res.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # 7 full + 1 short
    assert all(p.grad is None for p in a.parameters())  # nothing left over for a next epoch to inherit
    mid = tmp_path / "a" / "checkpoints" / "q" / "step-00000010.safetensors"  # inside epoch 2
    b = copy.deepcopy(base)
    fit(b, digits.train, digits.val, cfg, num_classes=10, batch_size=48, run_dir=tmp_path / "b", stage="q",
        resume=mid, progress=False)  # fmt: skip
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_fake_quant_delay_trains_in_float_first(qat_start, digits):
    m = copy.deepcopy(qat_start)
    seen = []
    m.net[1].register_forward_pre_hook(lambda mod, args: seen.append(bool(mod.weight_quant.fake_quant_on)))
    cfg = TrainConfig(epochs=1, lr=1e-4, fake_quant_delay_steps=10, validation=False)
    fit(m, digits.train, None, cfg, num_classes=10, batch_size=64, progress=False)
    assert seen[:10] == [False] * 10 and all(seen[10:16])


def test_nonfinite_loss_with_guards_off_skips_cleanly(digits):
    x, y = digits.train.tensors
    x = x.clone()
    x[3] = float("nan")
    m = MLP(digits.input_shape, 10, hidden=[16])
    cfg = TrainConfig(epochs=1, guards=GuardConfig(enabled=False), validation=False)
    res = fit(m, TensorDataset(x, y), None, cfg, num_classes=10, batch_size=64, progress=False)
    assert res.steps == 16 and res.interventions == []  # the NaN batch adds no gradient; nothing recorded


BAD_STATES = {  # what is wrong in the file: (how to make it, what the one-line message names)
    "negative step": (lambda m, t: m["counters"].update(step=-5), "counters.step is -5"),
    "epoch past the recipe": (lambda m, t: m["counters"].update(epoch=10**9), "counters.epoch is 1000000000, more"),
    "skip past the epoch": (lambda m, t: m["counters"].update(skip=17), "counters.skip is 17, more than the 16"),
    "step of the wrong type": (lambda m, t: m["counters"].update(step="12"), "counters.step is '12'"),
    "bool for a number": (lambda m, t: m["counters"].update(lr=True), "counters.lr is True"),
    "guards missing": (lambda m, t: m["counters"].pop("guards"), "counters.guards is missing"),
    "counters not a mapping": (lambda m, t: m.update(counters=[1]), "counters are list"),
    "no state": (lambda m, t: m.pop("state"), "field 'state' is missing"),
    "no scheduler entry": (lambda m, t: m["state"].pop("scheduler"), "state.scheduler is missing"),
    "optimizer not a mapping": (lambda m, t: m["state"].update(optimizer=[1, 2]), "state.optimizer is malformed"),
    "dangling tensor": (lambda m, t: t.pop("optim/state/0/exp_avg"), "refers to tensor 'optim/state/0/exp_avg'"),
    "no numpy RNG": (lambda m, t: t.pop("rng/numpy"), "tensor 'rng/numpy' is missing"),
    "python RNG cut short": (lambda m, t: m["rng"].update(python=[3, [1, 2], None]), "rng.python is malformed"),
}


@pytest.fixture(scope="module")
def good_state(qat_start, digits, tmp_path_factory):
    """A training-state checkpoint after one epoch of 16 steps (2 epochs configured)."""
    folder = tmp_path_factory.mktemp("good")
    fit(copy.deepcopy(qat_start), digits.train, None, TrainConfig(epochs=2, max_steps=16, validation=False),
        num_classes=10, batch_size=64, run_dir=folder, stage="qat", progress=False)  # fmt: skip
    return folder / "checkpoints" / "qat" / "last.safetensors"


def tampered(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src`` with its header or tensors edited, and a valid content hash (so only the edit is wrong)."""
    from safetensors.torch import load_file

    meta, tensors = read_metadata(src), load_file(str(src))
    meta = {k: v for k, v in meta.items() if k not in ("format", "sha256")}
    edit(meta, tensors)
    return save_weights(dst, tensors, meta)


@pytest.mark.parametrize("bad", list(BAD_STATES))
def test_a_malformed_training_state_is_refused_naming_the_file_and_field(qat_start, digits, good_state, tmp_path, bad):
    edit, message = BAD_STATES[bad]
    path = tampered(good_state, tmp_path / "bad.safetensors", edit)
    cfg = TrainConfig(epochs=2, validation=False)
    with pytest.raises(CheckpointError) as e:
        fit(copy.deepcopy(qat_start), digits.train, None, cfg, num_classes=10, batch_size=64, run_dir=tmp_path,
            stage="qat", resume=path, progress=False)  # fmt: skip
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_a_good_training_state_resumes_and_a_bad_step_checkpoint_is_named(qat_start, digits, good_state, tmp_path):
    path = tampered(good_state, tmp_path / "copy.safetensors", lambda m, t: None)
    res = fit(copy.deepcopy(qat_start), digits.train, None, TrainConfig(epochs=2, validation=False), num_classes=10,
              batch_size=64, run_dir=tmp_path, stage="qat", resume=path, progress=False)  # fmt: skip
    assert res.steps == 32  # the tampering helper itself leaves a loadable file
    folder = tmp_path / "checkpoints" / "qat"
    tampered(good_state, folder / "step-00000099.safetensors", lambda m, t: m["counters"].update(step=-5))
    with pytest.raises(CheckpointError, match=r"step-00000099.safetensors: counters.step is -5"):
        newest_checkpoint(folder)
