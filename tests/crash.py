"""A crash between two optimiser steps, for resume tests: what kill -9 does, without a second process."""

from qatkit.train.logger import RunLogger

LOG_STEP = RunLogger.step


class Crash(BaseException):
    """Stands for kill -9: the process stops between two writes, nothing is saved on the way out."""


def record_steps(monkeypatch, crash_after: int | None = None) -> list[tuple[int, float]]:
    """(step, loss) of every optimiser step this process runs from now on; optionally crash after some."""
    seen = []

    def step(self, n, scalars):
        LOG_STEP(self, n, scalars)
        seen.append((n, scalars["loss"]))
        if len(seen) == crash_after:
            raise Crash

    monkeypatch.setattr(RunLogger, "step", step)
    return seen
