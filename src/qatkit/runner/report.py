"""The run report: one row per (variant, stage, runtime), written as report.json and report.md."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.runner.criteria import judge
from qatkit.runner.criteria import markdown as criteria_markdown
from qatkit.runner.sensitivity_run import sensitivity_lines
from qatkit.tasks import TASKS, Task
from qatkit.train.compiled import CompileInfo
from qatkit.transform.prepare import layers_markdown


@dataclass
class Row:
    variant: str
    stage: str
    runtime: str
    metrics: dict | None
    size_bytes: int | None = None
    agreement: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    status: dict | None = None
    file: str | None = None
    format: str = "pytorch"
    precision: str | None = None
    parity: str | None = None
    """Exported files only: "ok", "failed: <why>", or "structure ok (not run)" where no runtime exists here."""
    details: dict | None = None
    """Exported files only: integer kernels (ONNX Runtime), op counts (LiteRT, Core ML), stored-weight checks."""
    float_layers: list[str] = field(default_factory=list)
    """Exported integer files only: quantized layers the runtime still runs in float (ONNX: layer names; LiteRT:
    ops with float inputs)."""

    @property
    def label(self) -> str:
        return "fp32" if self.variant == "fp32" else f"{self.variant} {self.stage}"


@dataclass
class Report:
    recipe: dict
    data: dict
    class_names: list[str]
    rows: list[Row] = field(default_factory=list)
    layers: dict[str, dict] = field(default_factory=dict)
    warm_start: dict[str, dict] = field(default_factory=dict)
    training: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    folding: dict = field(default_factory=dict)
    """BatchNorm folding: which were folded, which were left and why (transform/fold.py)."""
    sensitivity: dict[str, dict] = field(default_factory=dict)
    """Per variant with mixed_precision: each layer's divergence per width and the widths chosen."""

    @property
    def task(self) -> Task:
        """The run's task, rebuilt from the recipe (so a report read back from JSON shows the same columns)."""
        cfg = self.recipe.get("task") or {"name": "classification"}
        cls = TASKS[cfg["name"]]
        return cls(len(self.class_names), self.class_names, cfg.get("threshold", 0.5))

    def warnings(self) -> list[str]:
        """What a reader must not miss: quantized layers that an exported file runs in float, BatchNorms left
        unfolded, quantization notes (e.g. where_needed falling back)."""
        out = [f"{r.label} {r.format} {r.precision}: quantized layers that {r.runtime} runs in float: "
               f"{', '.join(r.float_layers[:6])}{', ...' if len(r.float_layers) > 6 else ''}; this file is slower "
               "than an integer one" for r in self.rows if r.float_layers]  # fmt: skip
        out += [f"BatchNorm {name} not folded: {why}" for name, why in self.folding.get("left", {}).items()]
        out += [f"{stage}: the best epoch was 0 (QAT did not improve on its start): {'; '.join(s['no_gain'])}"
                for stage, s in self.training.items() if s.get("no_gain")]  # fmt: skip
        for v, layer in self.layers.items():
            out += [f"{v}: {note}" for note in layer.get("notes", [])]
        return out

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def find(self, variant: str, stage: str, runtime: str) -> Row | None:
        for r in self.rows:
            if (r.variant, r.stage, r.runtime) == (variant, stage, runtime):
                return r
        return None

    def checks(self) -> list[dict]:
        """Comparisons a reader needs, on the task's primary metric (accuracy; R² for regression): QAT vs PTQ,
        QAT vs FP32, every exported file vs its PyTorch model and their agreement."""
        task = self.task
        key, out = task.primary, []
        fp32 = self.find("fp32", "fp32", "pytorch")
        for v in self.layers:
            ptq, qat = self.find(v, "ptq", "pytorch"), self.find(v, "qat", "pytorch")
            if ptq and qat:
                out.append(_check(f"{v}: QAT {key} - PTQ {key}", qat.metrics[key] - ptq.metrics[key]))
            if fp32 and qat:
                out.append(_check(f"{v}: QAT {key} - FP32 {key}", qat.metrics[key] - fp32.metrics[key]))
        for r in self.rows:
            src = self.find(r.variant, r.stage, "pytorch")
            if r.runtime == "pytorch" or r.metrics is None or src is None:
                continue
            name = f"{r.label}: {r.format} {r.precision}"
            out.append(_check(f"{name} {key} - PyTorch {key}", r.metrics[key] - src.metrics[key]))
            out.append(_check(f"{name} {task.agreement_header.removesuffix(' %')} with PyTorch", r.agreement, "share"))
        return out

    def float_reference(self, r: Row) -> Row | None:
        """The float file a row's size and latency are compared with: the fp32 (Core ML: fp16) file of the same
        format; for packed checkpoints, the float PyTorch checkpoint."""
        if r.runtime == "pytorch":
            return None
        for c in self.rows:
            if c is r or c.variant != "fp32":
                continue
            if r.format == "packed":
                if c.runtime == "pytorch":
                    return c
            elif c.format == r.format and c.precision == ("fp16" if r.format == "coreml" else "fp32"):
                return c
        return None

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "data": self.data,
            "class_names": self.class_names,
            "rows": [asdict(r) for r in self.rows],
            "checks": self.checks(),
            "layers": self.layers,
            "warm_start": self.warm_start,
            "training": self.training,
            "seconds": self.seconds,
            "folding": self.folding,
            "sensitivity": self.sensitivity,
            "warnings": self.warnings(),
            "criteria": judge(self),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        """A report read back from report.json (unknown row keys from older versions are dropped)."""
        known = set(Row.__dataclass_fields__)
        rows = []
        for r in d["rows"]:
            if "format" not in r and r["runtime"] == "onnxruntime":  # reports from before the export formats
                r = dict(r, format="onnx", precision="fp32" if r["variant"] == "fp32" else "int8")
            rows.append(Row(**{k: v for k, v in r.items() if k in known}))
        return cls(d["recipe"], d["data"], d["class_names"], rows, d.get("layers", {}), d.get("warm_start", {}),
                   d.get("training", {}), d.get("seconds", 0.0), d.get("folding", {}),
                   d.get("sensitivity", {}))  # fmt: skip

    def write(self, out: Path, html: bool = True) -> None:
        """report.json (every number), report.md and, with ``html``, report.html (the page with plots) in the run
        folder."""
        atomic_write_bytes(out / "report.json", json.dumps(self.to_dict(), indent=2).encode())
        atomic_write_bytes(out / "report.md", self.to_markdown().encode())
        if html:
            from qatkit.runner.html_report import write_html

            write_html(self, out)

    def table_rows(self, full: bool = True) -> list[list[str]]:
        """Formatted rows; ``full=False`` shows only the worst class recall (for narrow terminals)."""
        rows = []
        for r in self.rows:
            m = r.metrics
            ref = self.float_reference(r)
            size = _mb(r.size_bytes)
            if ref is not None and r.size_bytes and ref.size_bytes:
                size += f" ({r.size_bytes / ref.size_bytes:.2f}x)"
            lat = []
            for b, ms in r.latency_ms.items():
                base = ref.latency_ms.get(b) if ref is not None else None
                lat.append(f"b{b}: {ms:.3f} ms" + (f" ({ms / base:.2f}x)" if base else ""))
            columns = self.task.columns()
            if m is None:
                metric_cells = ["not run"] + [""] * (len(columns) - 1)
            else:
                metric_cells = [c.show(m) for c in columns]
                if not full and "per_class_recall" in m:  # narrow terminals: the worst class only
                    metric_cells[-1] = f"{min(m['per_class_recall']):.2f}"
            precision = r.precision or ("fp32" if r.variant == "fp32" else "fake-quant")
            rows.append(
                [r.label, r.runtime, r.format, precision, *metric_cells, size,
                 "" if r.agreement is None else f"{100 * r.agreement:.2f}", "; ".join(lat), r.parity or ""]
            )  # fmt: skip
        return rows

    def header(self) -> list[str]:
        cols = [c.header for c in self.task.columns()]
        return ["stage", "runtime", "format", "precision", *cols, "size", self.task.agreement_header,
                "latency (vs float file)", "parity"]  # fmt: skip

    def to_markdown(self) -> str:
        name = self.recipe.get("name", "run")
        lines = [
            f"# qatkit report: {name}",
            "",
            self.recipe.get("description", "").strip(),
            "",
            *self.data_lines(),
            "",
            "| " + " | ".join(self.header()) + " |",
            "|" + "---|" * len(self.header()),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in self.table_rows()]
        lines += [
            "",
            "Sizes: PyTorch rows are the safetensors checkpoint (fake-quant weights are still float); exported "
            "rows are the written file (folder for .mlpackage), ratio to the float file of the same format (fp32; "
            "Core ML: fp16; packed: the float checkpoint). Latency: CPU, the recipe's latency_threads (default 1), median of interleaved rounds, "
            "ratio to the float file of the same format; LiteRT files are written at batch 1 and other batch sizes "
            "are timed on a copy converted at that batch. Agreement with the PyTorch model the file was exported "
            "from: share of test inputs with the same top-1 class (binary: the same decision at the threshold); "
            "for regression, the relative error (RMS difference over the spread of the source's outputs). Parity "
            "fails when an integer file agrees on fewer inputs than min_agreement (regression: errs more than "
            "max_rel_error) or any file loses more of the primary metric than max_accuracy_drop. "
            "Core ML files are not run (no Core ML runtime on Linux): their rows report structural checks only.",
            "",
            "## Checks",
            "",
        ]
        for c in self.checks():
            value = f"{100 * c['value']:.2f}%" if c["kind"] == "share" else f"{100 * c['value']:+.2f} points"
            lines.append(f"- {c['name']}: {value}")
        lines += criteria_markdown(judge(self))
        for v, record in self.sensitivity.items():
            lines += ["", f"## Mixed precision: {v}", "", *sensitivity_lines(record)]
        warnings = self.warnings()
        if warnings:
            lines += ["", "## Warnings", "", *[f"- {w}" for w in warnings]]
        if self.folding:
            f = self.folding
            lines += ["", "## BatchNorm folding", "", f"- folded {len(f['folded'])} into the preceding Conv/Linear: "
                      f"{', '.join(f['folded']) or 'none'}"]  # fmt: skip
            lines += [f"- left unfolded: {name}: {why}" for name, why in f.get("left", {}).items()]
            if not f.get("traced", True):
                lines.append(f"- torch.fx could not trace the model ({f.get('trace_error')}); only BatchNorm directly "
                             "after a Conv/Linear in an nn.Sequential was folded")  # fmt: skip
        detailed = [r for r in self.rows if r.details]
        if detailed:
            lines += ["", "## Inside the exported files", "",
                      "ONNX: integer kernels in ONNX Runtime's optimised graph. LiteRT: ops in the file and input "
                      "type. Core ML: ops in the ML Program; for compressed files, the stored weights decoded and "
                      "compared with the source model's (largest difference relative to the layer's largest weight).",
                      ""]  # fmt: skip
            for r in detailed:
                d = ", ".join(f"{k}: {_short_dict(v)}" for k, v in r.details.items())
                lines.append(f"- {r.label} {r.format} {r.precision}: {d}")
        if self.training:
            lines += ["", "## Training stages", "", "| stage | epochs | best epoch | steps | seconds | interventions |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for name, t in self.training.items():
                kinds = [i["kind"] for i in t.get("interventions", [])]
                summary = ", ".join(f"{k} x{kinds.count(k)}" for k in dict.fromkeys(kinds)) or "none"
                lines.append(f"| {name} | {t['epochs']} | {t['best_epoch']} | {t.get('steps', '')} | "
                             f"{t['seconds']:.1f} | {summary} |")  # fmt: skip
            for name, t in self.training.items():
                for i in t.get("interventions", []):
                    lines.append(f"- {name}, epoch {i['epoch']}, step {i['step']}: {i['kind']}: {i['detail']} "
                                 f"(lr {i['lr_before']} -> {i['lr_after']})")  # fmt: skip
                if t.get("gave_up"):
                    lines.append(f"- {name}: gave up: {t['gave_up']}")
                if t.get("compile"):
                    lines.append(f"- {name}: {CompileInfo(**t['compile']).describe()}")
            if any(t["best_epoch"] == 0 for t in self.training.values()):
                lines += ["", "Best epoch 0 means no training epoch beat the starting point on validation, so the "
                          "starting weights were kept."]  # fmt: skip
        for v, layer in self.layers.items():
            lines += ["", f"## Layers: {v}", "", layer["summary"], "", layers_markdown(layer["layers"])]
            if v in self.warm_start:
                lines += ["", self.warm_start[v]["summary"]]
        lines += ["", f"Total run time: {self.seconds:.1f} s."]
        return "\n".join(lines) + "\n"

    def data_lines(self) -> list[str]:
        """The data section: source, each input's shape, split sizes, class counts."""
        d = dict(self.data)
        inputs = d.pop("inputs", None)
        lines = [f"Data: {d.pop('source', '?')}; split {d.pop('split', 'given')}: train {d.pop('train', '?')}, "
                 f"val {d.pop('val', '?')}, test {d.pop('test', '?')}."]  # fmt: skip
        if inputs:
            how = "keyword arguments" if d.pop("keyword", False) else "positional arguments"
            lines.append(f"Inputs ({how}): " + ", ".join(f"{k} {v}" for k, v in inputs.items()) + ".")
        counts = d.pop("class_counts", None)
        if self.class_names:
            lines.append(f"Classes (recall order): {', '.join(self.class_names)}.")
        if counts:
            lines.append("Class counts: " + "; ".join(f"{k} {v}" for k, v in counts.items() if v) + ".")
        d.pop("keyword", None)
        d.pop("target", None)
        if d:
            lines.append("Also: " + ", ".join(f"{k} {v}" for k, v in d.items()) + ".")
        return [line for x in lines for line in (x, "")][:-1]

    def rich_table(self):
        """The end-of-run table for a terminal: one line per row within 120 columns (the task's headline metric,
        size, agreement, latency at the first batch, parity cut to fit); every column is in report.md."""
        from rich import box
        from rich.table import Table

        t = Table(title=f"qatkit report: {self.recipe.get('name', 'run')} (all columns: report.md)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)  # fmt: skip
        metric = self.task.columns()[0].header
        batch = next((b for r in self.rows for b in r.latency_ms), None)
        for name, width in (("stage", 18), ("file", 19), (metric, 10), ("size", 17), (self.task.agreement_header, 13),
                            (f"latency b{batch}" if batch else "latency", 16), ("parity", 18)):  # fmt: skip
            t.add_column(name, no_wrap=True, overflow="ellipsis", max_width=width)
        for r, cells in zip(self.rows, self.table_rows(full=False), strict=True):
            file = "pytorch" if r.runtime == "pytorch" else f"{r.format} {r.precision or ''}".strip()
            latency = cells[-2].split("; ")[0].split(": ", 1)[-1] if batch and f"b{batch}:" in cells[-2] else ""
            n_metrics = len(self.task.columns())
            t.add_row(r.label, file, cells[4], cells[4 + n_metrics], cells[5 + n_metrics], latency, cells[-1])
        return t


def _check(name: str, value: float, kind: str = "delta") -> dict:
    """A named comparison: ``delta`` in accuracy (fraction) or a ``share`` such as agreement."""
    return {"name": name, "value": value, "kind": kind}


def _short_dict(v) -> str:
    if isinstance(v, dict):
        if not v:
            return "none"
        return "{" + ", ".join(f"{k}={_short_dict(x)}" for k, x in v.items()) + "}"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _mb(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"
