"""Where training numbers go: a CSV per stage (always), TensorBoard scalars, Weights & Biases when asked.

Only the main process of a multi-process run writes anything.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
from torch import nn

from qatkit.nn.fake_quantizer import FakeQuantizer
from qatkit.quant.affine import clipped_fraction
from qatkit.train.config import LoggingConfig


class CsvLog:
    """Append-only CSV; the header comes from the first row (later rows may only use those keys)."""

    def __init__(self, path: str | Path, fields: list[str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields = fields
        if fields is not None and not self.path.exists():
            with self.path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writeheader()

    def write(self, row: dict) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row)
        with self.path.open("w" if new else "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def rows(self) -> list[list[str]]:
        """The header and the rows as written (empty without a file)."""
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.reader(f))

    def truncate(self, n: int) -> None:
        """Keep the header and the first ``n`` rows."""
        rows = self.rows()
        if len(rows) > n + 1:
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerows(rows[: n + 1])


class RunLogger:
    """Fan-out of a stage's scalars. ``run_dir=None`` or ``enabled=False`` logs nothing."""

    EPOCH_FIELDS = ["epoch", "step", "lr", "train_loss", "grad_norm_mean", "grad_norm_max", "skipped_steps"]
    STEP_FIELDS = ["step", "loss", "lr", "grad_norm", "seconds"]

    def __init__(self, run_dir: str | Path | None, stage: str, cfg: LoggingConfig, enabled: bool = True,
                 resume: bool = False, val_fields: tuple[str, ...] | list[str] = ("val_accuracy", "val_loss",
                                                                                   "val_macro_f1"),
                 purge_step: int | None = None):  # fmt: skip
        self.on = enabled and run_dir is not None
        self.console = enabled
        self.stage = stage
        self.tb = self.wandb = None
        self.n_interventions = 0
        if not self.on:
            return
        run_dir = Path(run_dir)
        csv_path = run_dir / f"{stage}_train.csv"
        steps_path = run_dir / f"{stage}_steps.csv"
        for p in (csv_path, steps_path):
            if not resume and p.exists():
                p.unlink()
        self.csv = CsvLog(csv_path, [*self.EPOCH_FIELDS, *val_fields, "seconds"])
        self.steps = CsvLog(steps_path, self.STEP_FIELDS) if cfg.step_csv else None
        self.started = time.perf_counter()
        self.events = CsvLog(run_dir / "interventions.csv", ["stage", "step", "epoch", "kind", "detail", "lr_before",
                                                             "lr_after", "metric_before", "metric_after"])  # fmt: skip
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard" / stage), purge_step=purge_step)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError("logging.wandb: true needs the wandb package: pip install 'qatkit[wandb]'") from None
            self.wandb = wandb.init(project=cfg.wandb_project, name=f"{run_dir.name}/{stage}", dir=str(run_dir),
                                    resume="allow")  # fmt: skip

    def rewind(self, epoch_rows: int, step: int) -> None:
        """On resume: drop the CSV rows written after the checkpoint (epoch rows past ``epoch_rows``, steps past
        ``step``), which the resumed run writes again."""
        if not self.on:
            return
        self.csv.truncate(epoch_rows)
        if self.steps is not None:
            rows = self.steps.rows()
            col = rows[0].index("step") if rows else 0
            kept = [i for i, r in enumerate(rows[1:], 1) if int(r[col]) <= step]
            self.steps.truncate(max(kept, default=0))

    def step(self, step: int, scalars: dict[str, float]) -> None:
        """Per optimiser step: loss, LR, gradient norm (TensorBoard / W&B only; the CSV is per epoch)."""
        if not self.on:
            return
        if self.steps is not None:
            self.steps.write({"step": step, **scalars, "seconds": round(time.perf_counter() - self.started, 3)})
        for k, v in scalars.items():
            if self.tb:
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log({f"{self.stage}/train/{k}": v for k, v in scalars.items()}, step=step)

    def epoch(self, row: dict, model: nn.Module | None = None, quantizer_stats: bool = True) -> None:
        if not self.on:
            return
        self.csv.write(row)
        step = int(row["step"])
        scalars = {f"epoch/{k}": float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if model is not None and quantizer_stats:
            scalars.update(quantizer_scalars(model))
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log({f"{self.stage}/{k}": v for k, v in scalars.items()}, step=step)

    def notice(self, text: str) -> None:
        """One line about how the stage trains (e.g. a compile fallback), on the console of the main process."""
        if self.console:
            from rich.console import Console

            Console(stderr=True).print(f"[yellow]{self.stage}[/]: {text}", highlight=False, soft_wrap=True)

    def intervention(self, row: dict) -> None:
        """Record a guard intervention: console (main process), interventions.csv, TensorBoard."""
        if self.console:
            from rich.console import Console

            Console(stderr=True).print(
                f"[yellow]guard[/] {self.stage} epoch {row['epoch']} step {row['step']}: {row['kind']}: {row['detail']}",
                highlight=False, soft_wrap=True,
            )  # fmt: skip
        if not self.on:
            return
        self.events.write(dict(row, stage=self.stage))
        if self.tb:
            self.tb.add_text("interventions", f"{row['kind']} at step {row['step']}: {row['detail']}", row["step"])
            self.n_interventions += 1
            self.tb.add_scalar("guards/interventions", self.n_interventions, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


@torch.no_grad()
def quantizer_scalars(model: nn.Module) -> dict[str, float]:
    """Per-layer quantizer health: mean scale, and for weights the fraction of values clipped by the range."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, FakeQuantizer):
            continue
        out[f"quant/{name}/scale_mean"] = float(m.scale.detach().float().mean())
        if m.is_weight:
            owner = model.get_submodule(name.rpartition(".")[0])
            w = owner.weight.detach()
            frac = clipped_fraction(
                w, m.scale.detach(), m.zero_point, m.spec.qmin, m.spec.qmax, m.ch_axis, m.group_size
            )
            out[f"quant/{name}/clipped_fraction"] = frac
    return out
