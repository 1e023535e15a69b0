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
    metrics: dict
    size_bytes: int | None = None
    agreement: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    fused_ops: dict[str, int] | None = None
    status: dict | None = None
    file: str | None = None

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
        """Comparisons a reader needs: QAT vs PTQ, QAT vs FP32, exported file vs its PyTorch model."""
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
            for stage in ("ptq", "qat"):
                src, onnx = self.find(v, stage, "pytorch"), self.find(v, stage, "onnxruntime")
                if src and onnx:
                    out.append(
                        _check(
                            f"{v}: ONNX {stage} accuracy - PyTorch {stage} accuracy",
                            onnx.metrics["accuracy"] - src.metrics["accuracy"],
                        )
                    )
                    out.append(_check(f"{v}: ONNX {stage} top-1 agreement with PyTorch", onnx.agreement, "share"))
        return out

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

    def write(self, out: Path) -> None:
        atomic_write_bytes(out / "report.json", json.dumps(self.to_dict(), indent=2).encode())
        atomic_write_bytes(out / "report.md", self.to_markdown().encode())

    def _table_rows(self, full: bool = True) -> list[list[str]]:
        """Formatted rows; ``full=False`` shows only the worst class recall (for narrow terminals)."""
        float_onnx = self.find("fp32", "fp32", "onnxruntime")
        rows = []
        for r in self.rows:
            m = r.metrics
            size = _mb(r.size_bytes)
            if float_onnx and r.runtime == "onnxruntime" and r.size_bytes and float_onnx.size_bytes:
                size += f" ({r.size_bytes / float_onnx.size_bytes:.2f}x)"
            lat = []
            for b, ms in r.latency_ms.items():
                base = float_onnx.latency_ms.get(b) if float_onnx else None
                ratio = f" ({ms / base:.2f}x)" if base and r is not float_onnx else ""
                lat.append(f"b{b}: {ms:.3f} ms{ratio}")
            recall = (
                " ".join(f"{x:.2f}" for x in m["per_class_recall"]) if full else f"{min(m['per_class_recall']):.2f}"
            )
            rows.append(
                [
                    r.label,
                    r.runtime,
                    f"{100 * m['accuracy']:.2f}",
                    f"{m['loss']:.4f}",
                    f"{100 * m['macro_f1']:.2f}",
                    recall,
                    size,
                    "" if r.agreement is None else f"{100 * r.agreement:.2f}",
                    "; ".join(lat),
                ]
            )
            if self.binary:
                rows[-1].insert(5, f"{m['roc_auc']:.4f}" if "roc_auc" in m else "")
        return rows

    @property
    def binary(self) -> bool:
        """Two-class task: the tables get a ROC-AUC column."""
        return len(self.class_names) == 2

    def header(self) -> list[str]:
        return self.HEADER[:5] + ["ROC-AUC"] + self.HEADER[5:] if self.binary else list(self.HEADER)

    HEADER = [
        "stage",
        "runtime",
        "accuracy %",
        "test NLL",
        "macro-F1 %",
        "per-class recall",
        "size",
        "top-1 agree %",
        "latency (vs fp32 ONNX)",
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
            "Sizes: PyTorch rows are the safetensors checkpoint (fake-quant weights are still float); ONNX rows "
            "are the exported file, ratio to the float ONNX file. Latency: ONNX Runtime CPU, median of interleaved "
            "rounds, ratio to the float ONNX file. Agreement: share of test inputs whose top-1 class matches the "
            "PyTorch model the file was exported from.",
            "",
            "## Checks",
            "",
        ]
        for c in self.checks():
            value = f"{100 * c['value']:.2f}%" if c["kind"] == "share" else f"{100 * c['value']:+.2f} points"
            lines.append(f"- {c['name']}: {value}")
        fused = [(r.label, r.fused_ops) for r in self.rows if r.fused_ops is not None]
        if fused:
            lines += ["", "## Integer kernels in ONNX Runtime's optimised graphs", ""]
            lines += [f"- {label}: {ops or 'none (runs in float)'}" for label, ops in fused]
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


def _mb(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"
