"""Training guards: what seed 000's and 002's troubleshooting guides ask a person to do, done automatically.

Non-finite loss or gradient: skip the step (an emergency checkpoint is written by the loop); after
``nonfinite_skips`` in a row, roll back to the last good state and cut the learning rate. Collapse: the
validation accuracy falls more than ``collapse_drop`` points in one epoch or ``collapse_below_best`` below the
best epoch: roll back to the best state and cut the learning rate. Every intervention is recorded; after
``max_interventions`` the guard gives up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qatkit.train.config import GuardConfig


class TrainingDiverged(RuntimeError):
    """Training kept producing non-finite values after every allowed intervention."""


@dataclass
class Intervention:
    step: int
    epoch: int
    kind: str
    detail: str
    lr_before: float | None = None
    lr_after: float | None = None
    metric_before: float | None = None
    metric_after: float | None = None


@dataclass
class Guards:
    """Decisions plus the counters behind them (saved in checkpoints so a resumed run keeps its budget)."""

    cfg: GuardConfig
    consecutive_nonfinite: int = 0
    interventions_used: int = 0
    log: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"consecutive_nonfinite": self.consecutive_nonfinite, "interventions_used": self.interventions_used,
                "log": self.log}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.interventions_used = int(state["interventions_used"])
        self.log = list(state["log"])

    @property
    def can_intervene(self) -> bool:
        return self.interventions_used < self.cfg.max_interventions

    def on_step(self, finite: bool) -> str:
        """``ok``, ``skip`` (drop this step) or ``rollback`` (too many non-finite steps in a row)."""
        if not self.cfg.enabled:
            return "ok"
        if finite:
            self.consecutive_nonfinite = 0
            return "ok"
        self.consecutive_nonfinite += 1
        return "rollback" if self.consecutive_nonfinite >= self.cfg.nonfinite_skips else "skip"

    def noise(self, points: float, n: int) -> float:
        """``noise_sigmas`` standard errors (in points) of an accuracy of ``points`` measured on ``n`` samples."""
        p = min(max(points / 100.0, 1.0 / n), 1.0 - 1.0 / n) if n > 1 else 0.5
        return self.cfg.noise_sigmas * 100.0 * (p * (1.0 - p) / max(n, 1)) ** 0.5

    def collapsed(
        self,
        acc_points: float,
        prev_points: float | None,
        best_points: float | None,
        n_val: int,
        metric: str = "accuracy",
    ) -> str | None:
        """Why this validation result is a collapse, or None."""
        if not self.cfg.enabled:
            return None
        if prev_points is not None:
            drop, limit = prev_points - acc_points, max(self.cfg.collapse_drop, self.noise(prev_points, n_val))
            if drop > limit:
                return (
                    f"validation {metric} fell {drop:.1f} points in one epoch ({prev_points:.1f} -> {acc_points:.1f})"
                )
        if best_points is not None:
            gap, limit = best_points - acc_points, max(self.cfg.collapse_below_best, self.noise(best_points, n_val))
            if gap > limit:
                return f"validation {metric} is {gap:.1f} points below the best epoch ({best_points:.1f} -> {acc_points:.1f})"
        return None

    def record(self, event: Intervention, uses_budget: bool = True) -> dict:
        if uses_budget:
            self.interventions_used += 1
        self.consecutive_nonfinite = 0 if event.kind.endswith("rollback") else self.consecutive_nonfinite
        row = asdict(event)
        self.log.append(row)
        return row
