"""The run report: one row per (variant, stage, runtime), written as report.json and report.md."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import atomic_write_bytes
from .prepare import layers_markdown


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

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def find(self, variant: str, stage: str, runtime: str) -> Row | None:
        for r in self.rows:
            if (r.variant, r.stage, r.runtime) == (variant, stage, runtime):
                return r
        return None

    def checks(self) -> list[dict]:
        """Comparisons a reader needs: QAT vs PTQ, QAT vs FP32, every exported file vs its PyTorch model."""
        out = []
        fp32 = self.find("fp32", "fp32", "pytorch")
        for v in self.layers:
            ptq, qat = self.find(v, "ptq", "pytorch"), self.find(v, "qat", "pytorch")
            if ptq and qat:
                out.append(
                    _check(f"{v}: QAT accuracy - PTQ accuracy", qat.metrics["accuracy"] - ptq.metrics["accuracy"])
                )
            if fp32 and qat:
                out.append(
                    _check(f"{v}: QAT accuracy - FP32 accuracy", qat.metrics["accuracy"] - fp32.metrics["accuracy"])
                )
        for r in self.rows:
            src = self.find(r.variant, r.stage, "pytorch")
            if r.runtime == "pytorch" or r.metrics is None or src is None:
                continue
            name = f"{r.label}: {r.format} {r.precision}"
            out.append(_check(f"{name} accuracy - PyTorch accuracy", r.metrics["accuracy"] - src.metrics["accuracy"]))
            out.append(_check(f"{name} top-1 agreement with PyTorch", r.agreement, "share"))
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
                   d.get("training", {}), d.get("seconds", 0.0))  # fmt: skip

    def write(self, out: Path) -> None:
        atomic_write_bytes(out / "report.json", json.dumps(self.to_dict(), indent=2).encode())
        atomic_write_bytes(out / "report.md", self.to_markdown().encode())

    def _table_rows(self, full: bool = True) -> list[list[str]]:
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
            if m is None:
                metric_cells = ["not run", "", "", ""]
            else:
                recall = m["per_class_recall"]
                metric_cells = [f"{100 * m['accuracy']:.2f}", f"{m['loss']:.4f}", f"{100 * m['macro_f1']:.2f}",
                                " ".join(f"{x:.2f}" for x in recall) if full else f"{min(recall):.2f}"]  # fmt: skip
            if self.binary:
                metric_cells.insert(3, f"{m['roc_auc']:.4f}" if m and "roc_auc" in m else "")
            precision = r.precision or ("fp32" if r.variant == "fp32" else "fake-quant")
            rows.append(
                [r.label, r.runtime, r.format, precision, *metric_cells, size,
                 "" if r.agreement is None else f"{100 * r.agreement:.2f}", "; ".join(lat), r.parity or ""]
            )  # fmt: skip
        return rows

    @property
    def binary(self) -> bool:
        """Two-class task: the tables get a ROC-AUC column."""
        return len(self.class_names) == 2

    def header(self) -> list[str]:
        return self.HEADER[:7] + ["ROC-AUC"] + self.HEADER[7:] if self.binary else list(self.HEADER)

    HEADER = [
        "stage",
        "runtime",
        "format",
        "precision",
        "accuracy %",
        "test NLL",
        "macro-F1 %",
        "per-class recall",
        "size",
        "top-1 agree %",
        "latency (vs float file)",
        "parity",
    ]

    def to_markdown(self) -> str:
        name = self.recipe.get("name", "run")
        lines = [
            f"# qatkit report: {name}",
            "",
            self.recipe.get("description", "").strip(),
            "",
            f"Data: {self.data}. Classes (recall order): {', '.join(self.class_names)}.",
            "",
            "| " + " | ".join(self.header()) + " |",
            "|" + "---|" * len(self.header()),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in self._table_rows()]
        lines += [
            "",
            "Sizes: PyTorch rows are the safetensors checkpoint (fake-quant weights are still float); exported "
            "rows are the written file (folder for .mlpackage), ratio to the float file of the same format (fp32; "
            "Core ML: fp16; packed: the float checkpoint). Latency: CPU, the recipe's latency_threads (default 1), median of interleaved rounds, "
            "ratio to the float file of the same format; LiteRT files are written at batch 1 and other batch sizes "
            "are timed on a copy converted at that batch. Agreement: share of test inputs whose top-1 class "
            "matches the PyTorch model the file was exported from. Parity fails when an integer file agrees on "
            "fewer inputs than the recipe's min_agreement or any file loses more accuracy than max_accuracy_drop. "
            "Core ML files are not run (no Core ML runtime on Linux): their rows report structural checks only.",
            "",
            "## Checks",
            "",
        ]
        for c in self.checks():
            value = f"{100 * c['value']:.2f}%" if c["kind"] == "share" else f"{100 * c['value']:+.2f} points"
            lines.append(f"- {c['name']}: {value}")
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
            if any(t["best_epoch"] == 0 for t in self.training.values()):
                lines += ["", "Best epoch 0 means no training epoch beat the starting point on validation, so the "
                          "starting weights were kept."]  # fmt: skip
        for v, layer in self.layers.items():
            lines += ["", f"## Layers: {v}", "", layer["summary"], "", layers_markdown(layer["layers"])]
            if v in self.warm_start:
                lines += ["", self.warm_start[v]["summary"]]
        lines += ["", f"Total run time: {self.seconds:.1f} s."]
        return "\n".join(lines) + "\n"

    def rich_table(self):
        from rich.table import Table

        t = Table(title=f"qatkit report: {self.recipe.get('name', 'run')}")
        for h in self.header():
            t.add_column("worst recall" if h == "per-class recall" else h)
        for r in self._table_rows(full=False):
            t.add_row(*r)
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
