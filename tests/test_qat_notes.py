"""'QAT did nothing' explained: the reasons and their numbers, checked by hand and on a run whose LR is too small."""

import math

import qatkit
from qatkit.runner.qat_notes import why_no_gain


def test_reasons_carry_their_numbers():
    # 100 validation rows at 90%: one standard error is sqrt(0.9 * 0.1 / 100) = 3 points
    reasons = why_no_gain([0.90, 0.91, 0.905], 100, ptq_gap=0.2, moved=0.1, share=True)
    assert reasons[0].startswith("the validation set (100 rows) cannot separate epochs: the best later epoch was +1.00")
    assert "two standard errors are 6.00 points" in reasons[0]
    assert "PTQ was already within 0.20 points of FP32" in reasons[1]
    assert "weights moved 0.10 quantization steps" in reasons[2]
    none = why_no_gain([0.5, 0.9], 10_000, ptq_gap=10.0, moved=3.0, share=True)
    assert none == ["none of the known reasons (small validation set, no PTQ gap, tiny LR) applies"]
    assert why_no_gain([], 0, None, math.nan, False) == none


def test_a_qat_stage_whose_lr_is_too_small_says_so(tmp_path):
    recipe = {"name": "tiny-lr", "data": {"name": "digits"}, "model": {"name": "mlp", "args": {"hidden": [32]}},
              "fp32": {"train": {"epochs": 3, "lr": 0.01, "logging": {"tensorboard": False}}},
              "variants": [{"name": "w2", "quant": {"rules": [{"match": "*", "weight": {"bits": 2}}]},
                            "ptq": {"calib_batches": 2},
                            "qat": {"epochs": 2, "lr": 1e-9, "logging": {"tensorboard": False}}}],
              "export": {"formats": []}}  # fmt: skip
    report = qatkit.run(recipe, tmp_path / "out", progress=False)
    summary = report.training["w2_qat"]
    assert summary["best_epoch"] == 0  # at lr 1e-9 no epoch can beat the start
    assert any("weights moved 0.00 quantization steps" in r for r in summary["no_gain"])
    assert any("w2_qat: the best epoch was 0" in w for w in report.warnings())
