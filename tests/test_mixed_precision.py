"""Sensitivity and mixed precision: the solver against brute force, a deliberately fragile layer ranked first,
and the rewritten recipe quantizing each layer at its chosen width."""

import itertools
import random

import pytest
import torch
from torch import nn

from qatkit.base.config import RecipeError
from qatkit.transform.mixed_precision import average_bits, choose_bits, mixed_recipe
from qatkit.transform.prepare import prepare
from qatkit.transform.sensitivity import LayerSensitivity, SensitivityReport, measure


def random_report(rng: random.Random, layers: int, cands: list[int]) -> SensitivityReport:
    out = []
    for i in range(layers):
        w = rng.choice([16, 64, 100, 256, 1000])
        # divergence falls with width, at a layer-specific rate
        base = rng.uniform(0.01, 5.0)
        out.append(LayerSensitivity(f"l{i}", w, {b: base * 2.0 ** (-b * rng.uniform(0.5, 1.5)) for b in cands}))
    return SensitivityReport(cands, 1.0, out)


@pytest.mark.parametrize("seed", range(12))
def test_solver_matches_brute_force(seed):
    rng = random.Random(seed)
    cands = [2, 3, 4, 8]
    rep = random_report(rng, rng.randint(2, 6), cands)
    budget = rng.uniform(2.2, 6.0)
    total = sum(s.weights for s in rep.layers)
    best = None
    for combo in itertools.product(cands, repeat=len(rep.layers)):
        if sum(s.weights * b for s, b in zip(rep.layers, combo, strict=True)) <= budget * total + 1e-9:
            div = sum(s.divergence[b] for s, b in zip(rep.layers, combo, strict=True))
            best = div if best is None or div < best else best
    chosen = choose_bits(rep, budget)
    assert average_bits(rep, chosen) <= budget + 1e-9
    assert sum(s.divergence[chosen[s.name]] for s in rep.layers) == pytest.approx(best)


def test_budget_below_the_narrowest_width_is_refused():
    rep = random_report(random.Random(0), 3, [2, 4])
    with pytest.raises(RecipeError, match="below the narrowest width 2"):
        choose_bits(rep, 1.5)


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def fragile_model() -> Three:
    torch.manual_seed(0)
    m = Three()
    with torch.no_grad():  # an outlier on an input that is always 0: harmless in float, but on a per-tensor
        m.a.weight[0].zero_()  # 2-4 bit grid it rounds every other weight of b to zero
        m.a.bias[0] = -1.0
        m.b.weight[:, 0] = 5.0
    return m


def test_the_fragile_layer_ranks_first_and_gets_the_most_bits():
    model = fragile_model()
    x = torch.randn(256, 16)
    quant = {"rules": [{"match": "*", "weight": {"bits": 8, "granularity": "tensor"}}], "outputs": "rules"}
    rep = measure(model, quant, [2, 4, 8], [x[:64]], lambda m: m(x),
                  lambda out, ref: float((out - ref).pow(2).mean()), lambda out: 0.0)  # fmt: skip
    assert [s.name for s in rep.layers] == ["a", "b", "c"]
    for bits in (2, 4):
        assert rep.ranking(bits)[0] == "b"
    assert all(s.divergence[2] > s.divergence[8] for s in rep.layers)
    chosen = choose_bits(rep, 5.5)  # room for the fragile layer at 8 bits only if the others go to 2
    assert chosen == {"a": 2, "b": 8, "c": 2} and average_bits(rep, chosen) <= 5.5
    recipe = mixed_recipe(model, quant, chosen)
    prepared = Three()
    prepare(prepared, recipe)
    for name, bits in chosen.items():
        assert getattr(prepared, name).weight_quant.spec.bits == bits
        assert getattr(prepared, name).weight_quant.spec.granularity == "tensor"  # the rule's other settings kept


def test_a_run_with_mixed_precision_uses_the_chosen_widths(tmp_path, monkeypatch):
    import yaml

    import qatkit

    recipe = {"name": "mp", "data": {"name": "digits"}, "model": {"name": "mlp", "args": {"hidden": [32, 16]}},
              "fp32": {"train": {"epochs": 3, "lr": 0.01, "logging": {"tensorboard": False}}},
              "variants": [{"name": "mix", "quant": {"rules": [{"match": "*", "weight": {"bits": 2}}]},
                            "mixed_precision": {"budget_bits": 3.0, "candidates": [2, 4, 8], "eval_rows": 128},
                            "ptq": {"calib_batches": 1}, "qat": None}],
              "export": {"formats": []}}  # fmt: skip
    report = qatkit.run(recipe, tmp_path / "out", progress=False)
    record = report.sensitivity["mix"]
    chosen = record["chosen"]
    weights = {s["name"]: s["weights"] for s in record["layers"]}
    assert set(chosen) == {"net.1", "net.3", "net.5"} and set(chosen.values()) <= {2, 4, 8}
    mean = sum(weights[n] * b for n, b in chosen.items()) / sum(weights.values())
    assert mean == pytest.approx(record["average_bits"]) and mean <= 3.0
    layers = {r["name"]: r for r in report.layers["mix"]["layers"]}
    for name, bits in chosen.items():
        assert layers[name]["weight"].startswith(f"int{bits} ")  # the layer report shows the chosen width
    saved = yaml.safe_load((tmp_path / "out" / "mix_mixed_precision.yaml").read_text())
    again = qatkit.run({**recipe, "name": "mp2", "variants": [{"name": "mix", "quant": saved["quant"], "qat": None,
                        "ptq": {"calib_batches": 1}}]}, tmp_path / "again", progress=False)  # fmt: skip
    assert [r["weight"] for r in again.layers["mix"]["layers"]] == [r["weight"] for r in layers.values()]
    assert "## Mixed precision: mix" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "mix_sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from qatkit.recipe import parse_recipe
    from qatkit.runner.export_run import export_run
    from qatkit.runner.sensitivity_run import variant_quant

    # a later export rebuilds the model with the chosen widths

    rebuilt = variant_quant(tmp_path / "out", parse_recipe(recipe).variants[0])
    assert {r.match[0]: r.weight.bits for r in rebuilt.rules} == chosen
    exported, _ = export_run(tmp_path / "out", ["onnx"])
    assert exported.find("mix", "ptq", "onnxruntime").parity == "ok"
    # a resumed run keeps the widths it chose instead of measuring sensitivity again
    import qatkit.runner.pipeline as pipeline

    def measure_again(*args, **kwargs):
        raise AssertionError("sensitivity measured again on resume")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "choose_widths", measure_again)
        resumed = qatkit.run(recipe, tmp_path / "out", progress=False, resume="auto")
    assert resumed.sensitivity["mix"]["chosen"] == chosen
    qatkit.run(recipe, tmp_path / "out", progress=False)  # the folder holds only qatkit's files: a rerun may go there
