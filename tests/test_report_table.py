"""The end-of-run terminal table: one line per row within 120 columns, whatever the labels, formats and verdicts;
every column stays in report.md."""

from rich.console import Console

from qatkit.runner.report import Report, Row

METRICS = {"accuracy": 0.9123, "loss": 0.31, "macro_f1": 0.9, "per_class_recall": [0.9] * 10}


def report() -> Report:
    rows = [Row("fp32", "fp32", "pytorch", METRICS, size_bytes=300_000)]
    for variant in ("w8a8", "a-rather-long-variant-name-w4a8-lsq"):
        for stage in ("ptq", "qat"):
            rows.append(Row(variant, stage, "pytorch", METRICS, size_bytes=310_000))
            for fmt, precision in (("onnx", "int8"), ("tflite", "dynamic_int8"), ("coreml", "int8"),
                                   ("packed", "packed-int4")):  # fmt: skip
                rows.append(Row(variant, stage, "onnxruntime", None if fmt == "coreml" else METRICS, 123_456, 0.9962,
                                {"1": 0.123, "64": 4.5}, format=fmt, precision=precision,
                                parity="failed: top-1 agreement 96.00% < 99%; accuracy drop 3.1 points > 2.0"))  # fmt: skip
    return Report({"name": "table", "task": {"name": "classification"}}, {}, [str(i) for i in range(10)], rows)


def test_the_terminal_table_fits_120_columns_one_line_per_row():
    r = report()
    console = Console(width=120, record=True, color_system=None)
    console.print(r.rich_table())
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 120
    body = [line for line in lines if line.strip().startswith(("fp32", "w8a8", "a-rather"))]
    assert len(body) == len(r.rows)  # no row wrapped onto a second line
    assert any("w8a8 qat" in line and "onnx int8" in line and "99.62" in line and "failed" in line for line in body)
    md = r.to_markdown()
    assert "per-class recall" in md and "top-1 agreement 96.00% < 99%; accuracy drop 3.1 points > 2.0" in md
