"""Training loop pieces against references: scikit-learn metrics and class weights, schedule formulas."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, recall_score, roc_auc_score
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import TensorDataset

from qatkit.train import EarlyStopping, TrainConfig, class_weight_tensor, classification_metrics, fit
from qatkit.train.schedules import lr_multiplier


def test_polynomial_schedule_seed_003():
    f = lr_multiplier("polynomial", total_steps=100, warmup_steps=0, base_lr=1e-3, end_lr=1e-4, power=2)
    assert math.isclose(f(0) * 1e-3, 1e-3)
    assert math.isclose(f(50) * 1e-3, 1e-4 + (1e-3 - 1e-4) * 0.25)
    assert math.isclose(f(100) * 1e-3, 1e-4)


def test_warmup_cosine_schedule():
    f = lr_multiplier("cosine", total_steps=110, warmup_steps=10, base_lr=1.0, end_lr=0.0, power=1)
    assert [round(f(i), 6) for i in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert math.isclose(f(60), 0.5, abs_tol=1e-9)
    assert math.isclose(f(110), 0.0, abs_tol=1e-12)


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(200, 3)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 3, 200))
    m = classification_metrics(logits, y, 3)
    pred = logits.argmax(1).numpy()
    assert m["accuracy"] == pytest.approx((pred == y.numpy()).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["per_class_recall"] == pytest.approx(list(recall_score(y, pred, average=None)))
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)))
    assert "roc_auc" not in m
    b = classification_metrics(logits[:, :2], (y % 2), 2)
    assert b["roc_auc"] == pytest.approx(roc_auc_score(y % 2, torch.softmax(logits[:, :2], 1)[:, 1]))


def test_balanced_class_weights_match_sklearn():
    y = torch.tensor([0] * 90 + [1] * 10)
    ours = class_weight_tensor("balanced", y, 2)
    ref = compute_class_weight("balanced", classes=np.array([0, 1]), y=y.numpy())
    assert np.allclose(ours.numpy(), ref)


def _toy(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TensorDataset(x, y)


def test_fit_learns_logs_and_keeps_best(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    cfg = TrainConfig(
        epochs=8,
        lr=1e-2,
        schedule="cosine",
        warmup_epochs=1,
        grad_clip=1.0,
        label_smoothing=0.1,
        class_weights="balanced",
    )
    res = fit(model, _toy(), _toy(128, 1), cfg, num_classes=2, batch_size=32, run_dir=tmp_path, stage="toy",
              progress=False)  # fmt: skip
    assert res.best_metrics["accuracy"] > 0.9
    lines = (tmp_path / "toy_train.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,step,lr,train_loss,grad_norm_mean,grad_norm_max,skipped_steps,val_accuracy")
    assert len(lines) == 1 + 1 + 8  # header, the epoch-0 baseline, 8 epochs
    assert lines[1].startswith("0,0,")
    norms = [float(r.split(",")[5]) for r in lines[2:]]  # grad_norm_max: the norm before clipping
    assert all(math.isfinite(n) and n > 0 for n in norms)


def test_early_stopping_stops_and_restores_best():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    noise = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    cfg = TrainConfig(epochs=50, lr=1e-2, early_stopping=EarlyStopping(patience=3))
    res = fit(model, noise, noise, cfg, num_classes=2, batch_size=16, progress=False)
    assert res.stopped_early and len(res.history) == 1 + res.best_epoch + 3  # epoch-0 row, best, patience


def test_max_steps_stops_mid_epoch_and_the_step_csv_has_every_step(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    cfg = TrainConfig(epochs=10, max_steps=5, lr=1e-2, schedule="cosine",
                      logging={"step_csv": True, "tensorboard": False})  # fmt: skip
    res = fit(model, _toy(), _toy(128, 1), cfg, num_classes=2, batch_size=32, run_dir=tmp_path, stage="toy",
              progress=False)  # fmt: skip
    assert res.steps == 5  # 256 samples / 32 = 8 steps per epoch: stopped inside the first epoch
    rows = (tmp_path / "toy_steps.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,grad_norm,seconds" and [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5]
    lrs = [float(r.split(",")[2]) for r in rows[1:]]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)  # the cosine schedule spans max_steps, not the 10 epochs
    epochs = (tmp_path / "toy_train.csv").read_text().splitlines()
    assert len(epochs) == 1 + 2  # baseline + the partial epoch, validated when training stopped
