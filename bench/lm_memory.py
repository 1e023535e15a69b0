"""Peak memory of ``lm_train``: SmolLM2-135M and a randomly initialised model shaped like Qwen3-0.6B (issue 16).

One process per measurement, so its peak resident set size is that of ``lm_train`` alone (the KD cache is built
beforehand, in its own process). A sampler thread reads the resident set size every 50 ms and attributes it to
the stage ``lm_train`` last logged (preparing the LUT layers, training, evaluation, answers), so the table shows
where the peak is. The result is compared with the model's FP32 size and the estimate printed before training.

    .venv/bin/python bench/lm_memory.py --model smollm2 --stage cache
    .venv/bin/python bench/lm_memory.py --model smollm2 --steps 3 --json bench/results/lm_memory_smollm2.json
    .venv/bin/python bench/lm_memory.py --model qwen3-0.6b-shaped --stage cache
    .venv/bin/python bench/lm_memory.py --model qwen3-0.6b-shaped --steps 3 --batch-size 2 \\
        --json bench/results/lm_memory_qwen3_0.6b.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from qatkit.lm.cache import build_kd_cache
from qatkit.lm.corpus import read_texts, tokenize_corpus
from qatkit.lm.hf import load_causal_lm
from qatkit.lm.kd_task import KDTask
from qatkit.lm.rules import LMQuantConfig
from qatkit.lm.train import lm_train
from qatkit.train.config import TrainConfig

LICENCES = Path("/usr/share/common-licenses")
# Qwen3-0.6B's published shape (28 layers, hidden 1024, MLP 3072, 16 query / 8 key-value heads of 128, a tied
# 151,936-token embedding); the weights are random: this measures memory and step time, not quality.
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                 tie_word_embeddings=True, rope_theta=1_000_000.0)  # fmt: skip


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class Sampler(threading.Thread):
    """Peak resident set size per stage; the stage is the last line ``lm_train`` logged."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stage, self.peaks, self.running = "start", {}, True

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.stage = msg.split(":")[0].split(" in ")[0][:60]

    def run(self) -> None:
        while self.running:
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss_bytes())
            time.sleep(0.05)


def qwen3_shaped(folder: Path) -> Path:
    """Save a random Qwen3-0.6B-shaped model with SmolLM2's tokenizer (its ids fit the larger vocabulary)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    if (folder / "config.json").exists():
        return folder
    _, tok = load_causal_lm("smollm2")
    torch.manual_seed(0)
    config = Qwen3Config(**QWEN3_06B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def base_and_cache(args, work: Path) -> tuple[str, Path]:
    """The model to train and its KD cache (``--cache``, or the one ``--stage cache`` builds in ``work``)."""
    if args.model == "smollm2":
        return "smollm2", Path(args.cache or work / "smollm2_cache")
    return str(qwen3_shaped(work / "qwen3_0.6b_shaped")), Path(args.cache or work / "qwen3_cache")


def build_cache(args, work: Path) -> None:
    """The model's own KD cache over licence text (top-64 + 64 negatives, windows of 128 tokens): memory and step
    time depend on its shape, not on which text it holds."""
    base, cache = base_and_cache(args, work)
    teacher, tok = load_causal_lm(base)
    files = sorted(p for p in LICENCES.iterdir() if p.is_file() and not p.is_symlink())
    seqs = tokenize_corpus(read_texts(files), tok, 128)[: args.windows]
    shutil.rmtree(cache, ignore_errors=True)
    build_kd_cache(teacher, tok, seqs, cache, teacher_name=args.model, top_k=64, negatives=64, eval_fraction=0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "qwen3-0.6b-shaped"], default="smollm2")
    ap.add_argument("--stage", choices=["cache", "train"], default="train")
    ap.add_argument("--work", default="runs/bench_lm_memory")
    ap.add_argument("--cache", default=None, help="a KD cache for the model (default: the one --stage cache builds)")
    ap.add_argument("--windows", type=int, default=40, help="windows of 128 tokens in the cache --stage cache builds")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--preset", default="Q2_A4")
    ap.add_argument("--start", choices=["scratch", "v1", "v2"], default="scratch")
    ap.add_argument("--checkpoint", default=None, help="LUT checkpoint for --start v1 / v2")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--lean-memory", action="store_true", help="lm-train --lean-memory (glibc mmap threshold 1 MiB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.stage == "cache":
        build_cache(args, work)
        return
    base, cache = base_and_cache(args, work)
    sampler = Sampler()
    sampler.start()
    train = TrainConfig(epochs=1000, max_steps=args.steps, lr=5e-4, schedule="constant", grad_clip=1.0,
                        logging={"tensorboard": False, "quantizer_stats": False})  # fmt: skip
    out = work / f"run_{args.model}_{args.start}{'_ac' if args.activation_checkpointing else ''}"
    out = out.with_name(out.name + ("_lean" if args.lean_memory else ""))
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    summary = lm_train(cache=cache, out=out, train=train, batch_size=args.batch_size, base=base, start=args.start,
                       checkpoint=args.checkpoint, quant=LMQuantConfig(preset=args.preset),
                       task=KDTask(hard_full=0.0), activation_checkpointing=args.activation_checkpointing,
                       lean_memory=args.lean_memory, progress=False, log=sampler.log)  # fmt: skip
    sampler.running = False
    teacher_params = sum(p.numel() for p in load_causal_lm(base)[0].parameters())
    fp32 = teacher_params * 4
    res = {"command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
           "model": args.model, "start": args.start, "activation_checkpointing": args.activation_checkpointing,
           "lean_memory": args.lean_memory, "preset": args.preset, "batch_size": args.batch_size,
           "trainable_parameters": summary.get("trainable_parameters"), "parameters": teacher_params, "fp32_bytes": fp32,
           "peak_rss_bytes": summary["peak_rss_bytes"], "peak_vs_fp32": summary["peak_rss_bytes"] / fp32,
           "estimate": summary["memory_estimate"], "steps": summary["steps"],
           "seconds_per_step": summary["seconds"] / max(summary["steps"], 1), "total_seconds": time.perf_counter() - t,
           "peak_by_stage": dict(sorted(sampler.peaks.items(), key=lambda kv: -kv[1])[:8])}  # fmt: skip
    gib = 2**30
    print(f"{args.model}: {teacher_params:,} parameters, FP32 {fp32 / gib:.2f} GiB; peak RSS "
          f"{res['peak_rss_bytes'] / gib:.2f} GiB = {res['peak_vs_fp32']:.2f}x FP32; "
          f"{res['seconds_per_step']:.1f} s/step", flush=True)  # fmt: skip
    for stage, peak in res["peak_by_stage"].items():
        print(f"  {peak / gib:6.2f} GiB  {stage}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
