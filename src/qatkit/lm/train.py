"""``lm_train``: KD-QAT of a causal LM's LUT layers from a KD cache, in the shared training loop (seed 004).

Start from the float model (``scratch``), from a V1 checkpoint (converted to V2 with frozen indices, KD loss
reported before and after), or from a V2 / any LUT checkpoint (continue). Guards, checkpoints, resume, the
per-step CSV and TensorBoard are the training engine's; the best weights go to ``OUT/model.safetensors``.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import torch

from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.lm.cache import KDCache, read_manifest, source_ranges
from qatkit.lm.checkpoint import load_lut_model, save_lut_model
from qatkit.lm.convert import v1_to_v2
from qatkit.lm.hf import load_causal_lm, model_id, tokenizer_fingerprint
from qatkit.lm.kd_task import KDTask
from qatkit.lm.memory import describe, lean_allocator, peak_rss_bytes, release_free_memory, training_estimate
from qatkit.lm.quality import health, side_by_side, write_lm_report
from qatkit.lm.rules import LMQuantConfig, bits_per_weight, dequantized, lut_layers, prepare_lm, set_trainable
from qatkit.lm.teacher_data import greedy_answers, read_teacher_answers
from qatkit.runner.stages import newest_checkpoint, seed_everything
from qatkit.train import fit
from qatkit.train.config import TrainConfig
from qatkit.train.distributed import init_from_env
from qatkit.train.fsdp import full_model_state, is_sharded
from qatkit.train.helpers import make_loader

STARTS = ("scratch", "v1", "v2")


def kd_eval(model, data: KDCache, task: KDTask) -> dict:
    """KD loss, KL, top-1 agreement and perplexity on a cache split."""
    return task.evaluate(model, make_loader(data, task.val_batch_size, False), "cpu")


def load_student(start: str, base: str | None, checkpoint: str | Path | None, quant: LMQuantConfig, log=print):
    """The student to train and notes on how it was made (conversion losses are filled in by the caller)."""
    if start not in STARTS:
        raise ValueError(f"start {start!r} is not one of {', '.join(STARTS)}")
    if start == "scratch":
        if base is None:
            raise ValueError("training from scratch needs the float model (--model)")
        model, tok = load_causal_lm(base)
        t = time.perf_counter()
        report = prepare_lm(model, quant, log=log)
        log(f"{report.summary()} in {time.perf_counter() - t:.1f} s")
        return model, tok, model_id(base)
    if checkpoint is None:
        raise ValueError(f"start {start!r} needs a checkpoint")
    model, tok, meta = load_lut_model(checkpoint, base)
    forms = {m.spec.form for m in lut_layers(model).values()}
    if start == "v1" and forms != {"v1"}:
        raise ValueError(f"{checkpoint} is not a V1 checkpoint (its layers are {', '.join(sorted(forms))})")
    return model, tok, meta["base"] if base is None else model_id(base)


def lm_train(
    *,
    cache: str | Path,
    out: str | Path,
    train: TrainConfig,
    batch_size: int = 8,
    start: str = "scratch",
    base: str | None = None,
    checkpoint: str | Path | None = None,
    quant: LMQuantConfig | None = None,
    task: KDTask | None = None,
    resume: str | None = None,
    seed: int = 0,
    activation_checkpointing: bool = False,
    lean_memory: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    """Train, keep the best eval-loss weights, write ``model.safetensors`` and ``summary.json``; return the summary.

    ``activation_checkpointing``: keep only each decoder layer's input for the backward pass and recompute the
    layer there (Hugging Face's gradient checkpointing): less memory for about one more forward pass per step.
    ``lean_memory``: freed blocks of 1 MiB or more go back to the system at once (``lean_allocator``): a lower
    peak resident set, slower steps."""
    out = Path(out)
    train = train.model_copy(update={"monitor": "loss"})  # best = lowest eval KD loss (KD has no accuracy)
    # no in-memory copies of an LM and its optimizer, and no frozen embeddings in its training states
    lean = {
        k: v for k, v in (("in_memory", False), ("trainable_only", True)) if k not in train.checkpoint.model_fields_set
    }
    train = train.model_copy(update={"checkpoint": train.checkpoint.model_copy(update=lean)})
    quant = quant or LMQuantConfig()
    task = task or KDTask()
    info = init_from_env()  # under torchrun: join the process group (DDP, or FSDP with train.parallel: fsdp)
    log = log if info.main else _quiet
    t0 = time.perf_counter()
    seed_everything(seed)
    if lean_memory and not lean_allocator():
        log("--lean-memory: this C library's allocator cannot be tuned (glibc only); memory use is unchanged")
    model, tok, base_id = load_student(start, base, checkpoint, quant, log)
    fp = tokenizer_fingerprint(tok)
    train_ds, eval_ds = KDCache(cache, tok, "train", model), KDCache(cache, tok, "eval", model)
    summary: dict = {"start": start, "base": base_id, "cache": str(Path(cache).resolve()),
                     "train_sequences": len(train_ds), "eval_sequences": len(eval_ds)}  # fmt: skip
    if start == "v1":
        before = kd_eval(model, eval_ds, task)
        v1_to_v2(model)
        after = kd_eval(model, eval_ds, task)
        summary["v1_to_v2"] = {"kd_loss_before": before["loss"], "kd_loss_after": after["loss"]}
        log(f"V1 -> V2 (indices frozen): eval KD loss {before['loss']:.4f} -> {after['loss']:.4f}")
    gc.collect()  # the float weights the LUT layers replaced (and V1 latent weights) back to the system
    release_free_memory()
    summary["lean_memory"] = lean_memory
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    summary["activation_checkpointing"] = bool(getattr(model, flag, False))
    trainable = summary["trainable_parameters"] = set_trainable(model, quant.g_only)
    log(f"trainable parameters: {trainable:,}" + (" (magnitudes only)" if quant.g_only else ""))
    summary["memory_estimate"] = training_estimate(model, copies=train.checkpoint.in_memory)
    log(describe(summary["memory_estimate"]))

    ckpt = newest_checkpoint(out / "checkpoints" / "lm") if resume == "auto" else resume
    if resume == "auto" and ckpt is None:
        log("no checkpoint to resume from: starting fresh")
    fingerprint = {"task": "kd-lm", "tokenizer": fp, "layers": {n: m.spec.to_dict() for n, m in
                                                                  lut_layers(model).items()}}  # fmt: skip
    res = fit(model, train_ds, eval_ds, train, batch_size=batch_size, seed=seed, run_dir=out, stage="lm",
              resume=ckpt, fingerprint=fingerprint, progress=progress, objective=task)  # fmt: skip
    state = full_model_state(model) if is_sharded(model) else None  # every rank gathers; rank 0 writes
    if info.main:
        save_lut_model(out / "model.safetensors", model, base=base_id, tokenizer_fp=fp,
                       extra={"quant": quant.model_dump(mode="json")}, state=state)  # fmt: skip
    hist = res.history
    summary.update(res.summary(), best_metrics=res.best_metrics, bits=bits_per_weight(model),
                   first_eval=hist[0] if hist and hist[0]["epoch"] == 0 else None)  # fmt: skip
    summary["peak_rss_bytes"] = peak_rss_bytes()  # training's peak (quality() below generates text)
    summary.update(quality(model, tok, cache, task, log))
    summary["total_seconds"] = time.perf_counter() - t0
    summary["processes"] = info.world
    if not info.main:
        return summary
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1, default=_json_default).encode())
    log(f"report: {write_lm_report(out, summary)}")
    return summary


def quality(model, tok, cache: str | Path, task: KDTask, log=print) -> dict:
    """Held-out KD metrics per source of the cache, the health verdict (on teacher-generated text where the
    cache has it) and the student's greedy answers beside the teacher's (when the cache stored them)."""
    sources = list(source_ranges(read_manifest(cache)))
    per = {}
    for name in sources:
        ds = KDCache(cache, tok, "eval", model, source=name)
        if len(ds):
            per[name] = kd_eval(model, ds, task)
    where = "generated" if "generated" in per else next(iter(per), "")
    out: dict = {"eval_by_source": per, "health": {**health(per.get(where, {})), "source": where}}
    log(f"health on held-out {where} text: {out['health']['verdict']}"
        + "".join(f"; {f}" for f in out["health"]["failed"]))  # fmt: skip
    teacher = read_teacher_answers(cache)
    if teacher:
        if is_sharded(model):
            student = greedy_answers(model, tok, teacher["prompts"], teacher["chat"])
        else:
            with dequantized(model):
                student = greedy_answers(model, tok, teacher["prompts"], teacher["chat"])
        out["answers"] = side_by_side(teacher["prompts"], teacher["answers"], student)
    return out


def enable_activation_checkpointing(model) -> None:
    """Hugging Face's per-decoder-layer recomputation (named ``activation_checkpointing`` since transformers 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0 under torchrun."""


def _json_default(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    raise TypeError(type(v).__name__)
