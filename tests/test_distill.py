"""Knowledge distillation from the float model: each task's loss against explicit sums, the mixed loss at its
limits, cached and live teachers, resume mid-stage, and a whole run with a distilling QAT stage."""

import copy
import csv

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import qatkit
from crash import Crash, record_steps
from qatkit import calibrate, prepare
from qatkit.base.config import RecipeError
from qatkit.components.datasets import load_digits
from qatkit.components.models import MLP
from qatkit.runner.stages import newest_checkpoint
from qatkit.tasks import BinaryTask, ClassificationTask, RegressionTask
from qatkit.train import TrainConfig, fit, make_loader
from qatkit.train import distill as distill_mod
from qatkit.train.config import DistillConfig
from qatkit.train.distill import Indexed, Teacher, with_teacher


# ---- the losses against hand-written references -------------------------------------------------------------
def softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (torch.log(p) - torch.log(q))).sum(1)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_classification_is_hinton_kl_times_t_squared_with_the_analytic_gradient(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    s.requires_grad_(True)
    loss = ClassificationTask(5).distill_loss(s, t, T)
    kl = kl_rows(softmax(t / T), softmax(s.detach() / T)).mean()
    assert float(loss.detach()) == pytest.approx(float(kl) * T**2, rel=1e-5)  # float32 inside
    (grad,) = torch.autograd.grad(loss, s)
    analytic = (softmax(s.detach() / T) - softmax(t / T)) * T / len(s)  # d/ds of the batch mean
    torch.testing.assert_close(grad, analytic.float().double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_binary_one_logit_is_the_bernoulli_kl_and_two_logits_are_classification(T):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 1, generator=g).requires_grad_(True), torch.randn(8, 1, generator=g)
    loss = BinaryTask(2).distill_loss(s, t, T)
    p, q = 1 / (1 + torch.exp(-t / T)), 1 / (1 + torch.exp(-s.detach() / T))
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    assert float(loss.detach()) == pytest.approx(float(kl.mean()) * T**2, rel=1e-5)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(grad, (q - p) * T / len(s), rtol=1e-4, atol=1e-6)
    one = BinaryTask(2).distill_loss(s.detach().reshape(-1), t.reshape(-1), T)
    assert float(one) == pytest.approx(float(loss.detach()))
    s2, t2 = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    assert torch.equal(BinaryTask(2).distill_loss(s2, t2, T), ClassificationTask(2).distill_loss(s2, t2, T))
    with pytest.raises(ValueError, match="expected"):
        BinaryTask(2).distill_loss(torch.zeros(4, 3), torch.zeros(4, 3), T)


def test_regression_is_the_mse_between_outputs_whatever_the_temperature():
    s, t = torch.randn(7, 2), torch.randn(7, 2)
    want = float(((s - t) ** 2).mean())
    assert float(RegressionTask().distill_loss(s, t, 1.0)) == pytest.approx(want)
    assert float(RegressionTask().distill_loss(s, t, 4.0)) == pytest.approx(want)
    assert float(RegressionTask().distill_loss(s[:, 0], t[:, :1], 2.0)) == pytest.approx(
        float(((s[:, 0] - t[:, 0]) ** 2).mean())
    )


# ---- the mixed loss ------------------------------------------------------------------------------------------
def tiny_case(kind: str):
    """A task, a student, a different teacher and a small data set of that kind."""
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    task, out, y = {
        "classification": (ClassificationTask(3), 3, torch.randint(0, 3, (40,))),
        "binary": (BinaryTask(2), 1, torch.randint(0, 2, (40,))),
        "regression": (RegressionTask(num_targets=2), 2, torch.randn(40, 2)),
    }[kind]
    return task, nn.Linear(6, out), nn.Linear(6, out), TensorDataset(x, y)


def first_batch(ds, n: int = 16):
    return next(iter(make_loader(ds, n, False)))


@pytest.mark.parametrize("kind", ["classification", "binary", "regression"])
def test_weight_zero_is_the_task_loss_and_weight_one_on_the_teacher_itself_is_zero(kind):
    task, student, teacher, ds = tiny_case(kind)
    base = task.objective(TrainConfig())
    for cache in (True, False):
        obj, indexed = with_teacher(base, ds, DistillConfig(weight=0.0, temperature=3.0, cache=cache), teacher, "cpu")
        loss, n = obj.loss(student, first_batch(indexed), "cpu")
        want, m = base.loss(student, first_batch(ds), "cpu")
        assert torch.equal(loss, want) and n == m
        assert float(obj.parts["distill_loss"]) > 0
        obj, indexed = with_teacher(base, ds, DistillConfig(weight=1.0, temperature=3.0, cache=cache), student, "cpu")
        loss, _ = obj.loss(student, first_batch(indexed), "cpu")
        assert abs(float(loss.detach())) < (1e-10 if cache else 1e-30) and float(obj.parts["task_loss"]) > 0


def test_the_cache_maps_shuffled_rows_and_auto_falls_back_to_live(monkeypatch):
    task, student, teacher, ds = tiny_case("classification")
    t = Teacher(teacher)
    table = t.table(ds, "cpu", True)
    torch.testing.assert_close(table, teacher(ds.tensors[0]), rtol=0, atol=0)
    assert t.table(ds, "cpu", "auto") is table  # built once for every stage of the run
    rows, (x, _) = next(iter(make_loader(Indexed(ds), 8, True, 0)))
    torch.testing.assert_close(table[rows], t.outputs(x, "cpu"))  # batched matmuls may round differently
    monkeypatch.setattr(distill_mod, "CACHE_AUTO_BYTES", 100)
    small = Teacher(teacher)
    assert small.table(ds, "cpu", "auto") is None and t.table(ds, "cpu", False) is None
    assert small.table(ds, "cpu", True) is not None  # a later stage with cache: true builds it after all
    assert not any(p.requires_grad for p in t.model.parameters()) and not t.model.training


# ---- training: cached = live, resume, any task ---------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits(0.15, 0)


@pytest.fixture(scope="module")
def float_and_qat(digits):
    """A float MLP (the teacher, briefly trained) and its W4A8 copy with dropout, calibrated (the student)."""
    torch.manual_seed(0)
    fp = MLP(digits.input_shape, 10, hidden=[32], dropout=0.1)
    fit(fp, digits.train, None, TrainConfig(epochs=1, lr=3e-3, validation=False), num_classes=10, batch_size=64,
        progress=False)  # fmt: skip
    qat = copy.deepcopy(fp)
    prepare(qat, {"rules": [{"types": ["Linear"], "weight": {"bits": 4}, "activation": {}}], "outputs": "rules"})
    calibrate(qat, make_loader(digits.train, 64, True), 2)
    return fp, qat


def train(pair, digits, run_dir, cache, resume=None, weight=0.7):
    fp, qat = pair
    model = copy.deepcopy(qat)
    cfg = TrainConfig(epochs=2, lr=2e-3, schedule="cosine", checkpoint={"every_steps": 5, "keep": 2},
                      logging={"tensorboard": False}, distill={"weight": weight, "temperature": 3.0, "cache": cache})  # fmt: skip
    res = fit(model, digits.train, digits.val, cfg, num_classes=10, batch_size=64, run_dir=run_dir, stage="q",
              resume=resume, progress=False, teacher=fp)  # fmt: skip
    return model, res


def test_cached_and_live_teachers_train_identically(float_and_qat, digits, tmp_path, monkeypatch):
    runs = {}
    for cache in (True, False):
        torch.manual_seed(1)
        steps = record_steps(monkeypatch)
        model, res = train(float_and_qat, digits, tmp_path / str(cache), cache)
        runs[cache] = steps, model.state_dict(), res.history
    assert runs[True][0] == runs[False][0]  # every step's loss, bit for bit
    assert all(torch.equal(v, runs[False][1][k]) for k, v in runs[True][1].items())
    row = runs[True][2][-1]
    assert row["train_loss"] == pytest.approx(0.3 * row["train_task_loss"] + 0.7 * row["train_distill_loss"])
    with (tmp_path / "True" / "q_train.csv").open() as f:
        assert {"train_task_loss", "train_distill_loss"} <= set(next(csv.DictReader(f)))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "live"])
def test_resume_mid_stage_gives_the_uninterrupted_losses(float_and_qat, digits, tmp_path, monkeypatch, cache):
    torch.manual_seed(1)
    ref_steps = record_steps(monkeypatch)
    ref, _ = train(float_and_qat, digits, tmp_path / "ref", cache)
    torch.manual_seed(1)
    record_steps(monkeypatch, crash_after=23)
    with pytest.raises(Crash):
        train(float_and_qat, digits, tmp_path / "run", cache)
    ckpt = newest_checkpoint(tmp_path / "run" / "checkpoints" / "q")
    torch.manual_seed(99)  # the checkpoint's RNG state must take over
    steps = record_steps(monkeypatch)
    got, _ = train(float_and_qat, digits, tmp_path / "run", cache, resume=ckpt)
    assert steps == ref_steps[20:]
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in ref.state_dict().items())
    with (tmp_path / "ref" / "q_train.csv").open() as a, (tmp_path / "run" / "q_train.csv").open() as b:
        drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
        assert drop(csv.DictReader(a)) == drop(csv.DictReader(b))


@pytest.mark.parametrize("kind", ["binary", "regression"])
def test_other_tasks_distil_and_log_both_parts(kind):
    task, student, teacher, ds = tiny_case(kind)
    cfg = TrainConfig(epochs=2, lr=1e-2, validation=False, distill={"weight": 0.5, "temperature": 2.0})
    res = fit(student, ds, None, cfg, task=task, batch_size=8, progress=False, teacher=teacher)
    row = res.history[-1]
    assert row["train_loss"] == pytest.approx(0.5 * row["train_task_loss"] + 0.5 * row["train_distill_loss"])
    with pytest.raises(ValueError, match="distill: this stage has no teacher"):
        fit(student, ds, None, cfg, task=task, batch_size=8, progress=False)


# ---- the recipe and a whole run ------------------------------------------------------------------------------
QUICK = {
    "name": "kd",
    "data": {"name": "digits", "batch_size": 64},
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "fp32": {"train": {"epochs": 1, "max_steps": 6, "validation": False, "logging": {"tensorboard": False}}},
    "variants": [{"name": "a", "quant": "int8", "ptq": {"calib_batches": 1},
                  "qat": {"epochs": 1, "max_steps": 4, "validation": False, "logging": {"tensorboard": False}}}],
    "export": {"formats": []},
}  # fmt: skip


def with_distill(where: str, **settings) -> dict:
    r = copy.deepcopy(QUICK)
    stage = r["fp32"]["train"] if where == "fp32" else r["variants"][0]["qat"]
    stage["distill"] = {"weight": 0.8, "temperature": 2.0, **settings}
    return r


def qat_rows(out) -> list[dict]:
    with (out / "a_qat_train.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_run_distils_the_float_model_into_qat_and_the_float_stage_refuses(tmp_path):
    qatkit.run(QUICK, tmp_path / "plain", progress=False)
    qatkit.run(with_distill("qat"), tmp_path / "kd", progress=False)
    plain, kd = qat_rows(tmp_path / "plain"), qat_rows(tmp_path / "kd")
    assert "train_distill_loss" not in plain[0] and float(kd[0]["train_distill_loss"]) > 0
    assert float(plain[0]["train_loss"]) != float(kd[0]["train_loss"])
    with pytest.raises(RecipeError, match=r"fp32\.train\.distill: the float stage has no teacher"):
        qatkit.run(with_distill("fp32"), tmp_path / "refused", progress=False)
    with pytest.raises(RecipeError, match=r"distill\.weight.*less than or equal to 1"):
        qatkit.run(with_distill("qat", weight=1.5), tmp_path / "bad", progress=False)
    with pytest.raises(RecipeError, match=r"distill\.temperature.*greater than 0"):
        qatkit.run(with_distill("qat", temperature=0), tmp_path / "bad", progress=False)
