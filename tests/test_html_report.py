"""report.html: one self-contained page per run, opened in headless Chromium: it loads, and every plot decodes."""

import re
import shutil
import subprocess

import pytest

import qatkit

RECIPE = {
    "name": "html", "data": {"name": "digits"}, "model": {"name": "mlp", "args": {"hidden": [32]}},
    "fp32": {"train": {"epochs": 2, "lr": 0.003, "logging": {"tensorboard": False}}},
    "variants": [{"name": "w4", "quant": "w4a8", "ptq": {"calib_batches": 2},
                  "qat": {"epochs": 1, "lr": 0.001, "logging": {"tensorboard": False}}}],
    "export": {"formats": ["onnx"], "latency_batches": [1], "latency_seconds": 0.02},
}  # fmt: skip


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("chromium-headless-shell")


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
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); CI installs it")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", (run_dir / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:500]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(0)))
    assert attrs.get("loaded") == "yes"  # the page's script ran after load: no error stopped it
    assert int(attrs["plots"]) >= 5 and attrs["broken"] == ""  # every inline PNG decoded
