"""Chains of training stages inside a run folder: what is done, where each stage resumes, and refusal of
checkpoints made by a different recipe (with the differences named).

``progress.json`` lists finished stages and their final weights; ``checkpoints/<stage>/`` holds each stage's
training-state checkpoints (``last``, ``best``, ``step-N``, ``emergency-stepN``).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from qatkit.base.config import RecipeError
from qatkit.io.checkpoint import CheckpointError, atomic_write_bytes, load_weights, read_metadata, save_weights
from qatkit.io.jsonfile import read_json_object
from qatkit.train.config import TrainConfig, as_stages
from qatkit.train.distill import Teacher
from qatkit.train.distributed import barrier, current
from qatkit.train.loop import LoaderOptions, fit
from qatkit.train.state import read_counters
from qatkit.transform.bits import set_weight_bits

IGNORED_FOR_RESUME = ("name", "description", "export", "base_dir")
"""Recipe sections that do not change training state: editing them does not block a resume."""

CHANGEABLE_ON_RESUME = re.compile(
    r"(^|\.)(lr|epochs|max_steps|guards|logging|checkpoint|early_stopping)(\.|\[|$)"
    r"|^data\.(num_workers|persistent_workers|prefetch_factor|pin_memory)$|^device$"
)
"""Settings a resumed run may change (e.g. a lower LR after the guards gave up); anything else is refused."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def newest_checkpoint(folder: Path) -> Path | None:
    """The training-state checkpoint in ``folder`` (``last`` or ``step-N``) furthest along: most optimiser
    steps, then most finished epochs (``last`` after an epoch's validation beats that epoch's final step-N)."""
    candidates = [folder / "last.safetensors", *folder.glob("step-*.safetensors")]
    found = [(_position(p), p.name == "last.safetensors", p) for p in candidates if p.exists()]
    return max(found)[2] if found else None


def _position(path: Path) -> tuple[int, int]:
    """(optimiser steps, finished epochs) of a checkpoint, its counters checked."""
    counters = read_counters(path)
    return counters.get("step", 0), counters.get("epoch", 0)


def stage_names(prefix: str, cfgs: list[TrainConfig]) -> list[str]:
    if len(cfgs) == 1 and not cfgs[0].name:
        return [prefix]
    return [f"{prefix}-{cfg.name or i}" for i, cfg in enumerate(cfgs)]


def recipe_config(recipe) -> dict:
    data = recipe.model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in IGNORED_FOR_RESUME}


def differences(a, b, where: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: checkpoint {a!r} vs recipe {b!r}"]


def refuse_distill(cfgs: TrainConfig | list[TrainConfig], where: str) -> None:
    """RecipeError naming each stage of ``cfgs`` that asks for distillation (it has no teacher)."""
    bad = [f"{where}[{j}].distill" if isinstance(cfgs, list) else f"{where}.distill"
           for j, c in enumerate(as_stages(cfgs)) if c.distill is not None]  # fmt: skip
    if bad:
        raise RecipeError(f"{', '.join(bad)}: the float stage has no teacher to distil from (distill applies to QAT "
                          "stages, whose teacher is the float model); remove it")  # fmt: skip


class StageRunner:
    """Runs training stages for one ``qatkit run``, skipping finished ones and resuming the interrupted one."""

    def __init__(self, out: Path, recipe, data, resume: str | None, progress: bool, device: str = "cpu", task=None):
        self.out, self.recipe, self.data, self.progress, self.device = out, recipe, data, progress, device
        self.task = task
        self.info = current()
        self.progress_file = out / "progress.json"
        self.config = recipe_config(recipe)
        self.resume_mode = resume
        self.explicit: Path | None = None
        self.done: dict[str, str] = {}
        self.summaries: dict[str, dict] = {}
        if resume is None:
            self._clear_previous_run()
            self._write_progress()
            barrier()
        else:
            if self.progress_file.exists():
                saved = read_json_object(self.progress_file, CheckpointError, "a run's progress")
                self.done, self.summaries = saved.get("done"), saved.get("summaries", {})
                if not isinstance(self.done, dict) or not isinstance(self.summaries, dict):
                    raise CheckpointError(f"{self.progress_file}: 'done' and 'summaries' must be mappings")
            if resume != "auto":
                self.explicit = Path(resume)
                if not self.explicit.is_file():
                    raise CheckpointError(f"checkpoint not found: {self.explicit}")
        self.fingerprint = {"recipe_config": self.config}

    def _clear_previous_run(self) -> None:
        """A fresh run in a used folder: drop the old run's checkpoints and logs so nothing mixes."""
        if not self.info.main:
            return
        for sub in ("checkpoints", "tensorboard", "stages", "diagnose"):
            if (self.out / sub).is_dir():
                shutil.rmtree(self.out / sub)
        (self.out / "interventions.csv").unlink(missing_ok=True)
        for old in self.out.glob("*_train.csv"):
            old.unlink()

    def _write_progress(self) -> None:
        if self.info.main:
            data = {"done": self.done, "summaries": self.summaries}
            atomic_write_bytes(self.progress_file, json.dumps(data, indent=1).encode())

    def _resume_point(self, stage: str) -> Path | None:
        if self.explicit is not None:
            meta = read_metadata(self.explicit)
            return self.explicit if meta.get("stage") == stage else None
        if self.resume_mode == "auto":
            return newest_checkpoint(self.out / "checkpoints" / stage)
        return None

    def _check_same_recipe(self, ckpt: Path) -> None:
        meta = read_metadata(ckpt)
        if meta.get("kind") != "training-state":
            raise CheckpointError(f"{ckpt}: not a training-state checkpoint")
        diffs = [d for d in differences(meta.get("recipe_config"), self.config)
                 if not CHANGEABLE_ON_RESUME.search(d.split(":")[0])]  # fmt: skip
        if diffs:
            more = f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else ""
            raise CheckpointError(f"{ckpt} was made by a different recipe: {'; '.join(diffs[:5])}{more}")

    def train(self, model: torch.nn.Module, cfgs: TrainConfig | list[TrainConfig], prefix: str, base_seed: int,
              teacher: Teacher | None = None) -> None:  # fmt: skip
        """Train ``model`` through each stage of ``cfgs`` (a finished stage is loaded, not retrained);
        stages with ``distill`` learn from ``teacher`` (the float model)."""
        if teacher is None:
            refuse_distill(cfgs, "fp32.train" if prefix == "fp32" else prefix)
        cfgs = as_stages(cfgs)
        d, r = self.data, self.recipe
        opts = LoaderOptions(r.data.num_workers, r.data.persistent_workers, r.data.prefetch_factor, r.data.pin_memory)
        for i, (name, cfg) in enumerate(zip(stage_names(prefix, cfgs), cfgs, strict=True)):
            set_weight_bits(model, cfg.weight_bits)  # progressive bit-lowering (a no-op where the width stays)
            if name in self.done:
                # the stage's file in this folder (a copied or moved run folder resumes from its own files)
                model.load_state_dict(load_weights(self.out / "stages" / f"{name}.safetensors"))
                continue
            ckpt = self._resume_point(name)
            if ckpt is not None:
                self._check_same_recipe(ckpt)
            seed_everything(base_seed + i)
            bs = cfg.batch_size or r.data.batch_size
            res = fit(model, d.train, d.val, cfg, num_classes=d.num_classes, task=self.task, batch_size=bs,
                      seed=base_seed + i, loader=opts, run_dir=self.out, stage=name, resume=ckpt,
                      fingerprint=self.fingerprint, device=self.device, progress=self.progress,
                      teacher=teacher if cfg.distill else None)  # fmt: skip
            model.cpu()
            self.summaries[name] = res.summary()
            final = self.out / "stages" / f"{name}.safetensors"
            if self.info.main:
                save_weights(final, model.state_dict(), {"stage": name})
            self.done[name] = f"stages/{name}.safetensors"
            self._write_progress()
            barrier()
