"""report.html: one self-contained page per run, opened in headless Chromium: it loads, and every plot decodes."""

import re

import pytest

import qatkit
from browser import load_page

RECIPE = {
    "name": "html", "data": {"name": "digits"}, "model": {"name": "mlp", "args": {"hidden": [32]}},
    "fp32": {"train": {"epochs": 2, "lr": 0.003, "logging": {"tensorboard": False}}},
    "variants": [{"name": "w4", "quant": "w4a8", "ptq": {"calib_batches": 2},
                  "qat": {"epochs": 1, "lr": 0.001, "logging": {"tensorboard": False}}}],
    "export": {"formats": ["onnx"], "latency_batches": [1], "latency_seconds": 0.02},
}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "run"
    qatkit.run(RECIPE, out, progress=False)
    return out


def test_the_page_is_self_contained_and_puts_the_verdict_first(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "<h2>Verdict</h2>" in page and page.index("Verdict") < page.index("Stages and files") < page.index("Plots")
    assert not re.search(r"(src|href)=['\"]https?:", page)  # nothing fetched from the network
    plots = re.findall(r"data-plot='([^']+)'", page)
    assert {"training", "metric-vs-size", "per-class-recall", "confusion", "layer-error"} <= set(plots)
    assert page.count("src='data:image/png;base64,") == len(plots)


def test_headless_chromium_loads_the_page_and_every_plot(run_dir):
    attrs = load_page(run_dir / "report.html")
    assert attrs.get("loaded") == "yes"  # the page's script ran after load: no error stopped it
    assert int(attrs["plots"]) >= 5 and attrs["broken"] == ""  # every inline PNG decoded
