"""Bits per weight vs quality of SmolLM2-135M LUT students: MLP rank, attention rank and bits, table granularity,
and progressive Q4 -> Q2 against Q2 from the float model at equal CPU time (issue 16).

Every configuration is trained by ``lm_train`` from the float model for the same number of steps on the same KD
cache (teacher-written answers mixed with licence text, made by ``bench/lm_teacher_text.py``), then measured:
bits per weight on disk (indices, FP16 tables, FP16 scales: everything the packed file holds for the LUT
layers), held-out licence perplexity (GFDL/MPL, never in the cache) against the float model's, and teacher top-1
agreement and KL at T=1 on the cache's held-out generated windows. Results are appended to the JSON as each
configuration finishes, so an interrupted sweep continues where it stopped.

    .venv/bin/python bench/lm_bits.py --steps 30 --json bench/results/lm_bits.json
    .venv/bin/python bench/lm_bits.py --configs m2r4_a3r4 --steps 280 --json bench/results/lm_bits_preset.json
    .venv/bin/python bench/lm_bits.py --progressive m2r4_a3r4 --steps 100 --json bench/results/lm_progressive.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from qatkit.lm.checkpoint import load_lut_model, save_lut_model
from qatkit.lm.convert import to_target
from qatkit.lm.corpus import read_texts, tokenize_corpus
from qatkit.lm.hf import load_causal_lm, tokenizer_fingerprint
from qatkit.lm.kd_task import KDTask
from qatkit.lm.perplexity import perplexity
from qatkit.lm.rules import ATTENTION_PATTERNS, MLP_PATTERNS, LMQuantConfig, LUTRule
from qatkit.lm.train import lm_train
from qatkit.train.config import TrainConfig

LICENCES = Path("/usr/share/common-licenses")
HELD_OUT = ["GFDL-1.2", "GFDL-1.3", "MPL-1.1", "MPL-2.0"]
# name -> (MLP bits, MLP rank, MLP rows per table, attention bits, attention rank, attention rows per table);
# rows per table 1 = one table per output row, None = one table per layer.
CONFIGS = {
    "m2r32_a4r8": (2, 32, 1, 4, 8, 1),  # the Q2_A4 preset before this sweep
    "m2r16_a4r8": (2, 16, 1, 4, 8, 1),
    "m2r8_a4r8": (2, 8, 1, 4, 8, 1),
    "m2r4_a4r8": (2, 4, 1, 4, 8, 1),
    "m2r4_a4r4": (2, 4, 1, 4, 4, 1),
    "m2r4t_a4r4": (2, 4, None, 4, 4, 1),
    "m2r4_a3r4": (2, 4, 1, 3, 4, 1),
    "m2r8_a2r8": (2, 8, 1, 2, 8, 1),
    "m2r4t_a3r8": (2, 4, None, 3, 8, 1),
}


def quant_config(name: str, mlp_bits: int | None = None, attn_bits: int | None = None) -> LMQuantConfig:
    """The LUT rules of a named configuration (bits optionally overridden, for a progressive first stage)."""
    mb, mr, mg, ab, ar, ag = CONFIGS[name]
    return LMQuantConfig(preset=None, rules=[
        LUTRule(name="mlp", match=MLP_PATTERNS, bits=mlp_bits or mb, rank=mr, group_rows=mg),
        LUTRule(name="attention", match=ATTENTION_PATTERNS, bits=attn_bits or ab, rank=ar, group_rows=ag,
                attention=True)])  # fmt: skip


def train_config(steps: int, lr: float) -> TrainConfig:
    return TrainConfig(epochs=1000, max_steps=steps, lr=lr, schedule="cosine", warmup_epochs=0.1, weight_decay=0.0,
                       grad_clip=1.0, logging={"step_csv": True, "quantizer_stats": False})  # fmt: skip


def measure(summary: dict, run: Path, held: torch.Tensor) -> dict:
    """What one trained student scores: bits, held-out licence perplexity, agreement and KL on generated text."""
    student, _, _ = load_lut_model(run / "model.safetensors")
    gen = summary["eval_by_source"].get("generated", {})
    return {"bits_per_weight": summary["bits"]["bits_per_weight"], "overhead_bits": summary["bits"]["overhead_bits"],
            "licence_perplexity": perplexity(student, held)["perplexity"],
            "generated_perplexity": gen.get("perplexity"), "top1_agreement": gen.get("top1_agreement"),
            "kl_t1": gen.get("kl_t1"), "steps": summary["steps"], "train_seconds": summary["seconds"],
            "peak_rss_bytes": summary["peak_rss_bytes"], "answers": summary.get("answers")}  # fmt: skip


def run_config(args, name: str, held: torch.Tensor) -> dict:
    run = Path(args.work) / name
    shutil.rmtree(run, ignore_errors=True)
    summary = lm_train(cache=args.cache, out=run, train=train_config(args.steps, args.lr), batch_size=args.batch_size,
                       base="smollm2", quant=quant_config(name), task=KDTask(hard_full=0.0), progress=False)  # fmt: skip
    out = measure(summary, run, held)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # training states: 1-2 GB each
    return out


def run_progressive(args, name: str, held: torch.Tensor) -> dict:
    """Q4 MLP tables for half the steps, k-means down to the configuration's bits, then the other half; against
    the configuration trained from the float model for all the steps. Both report their measured CPU seconds."""
    base = Path(args.work) / f"progressive_{name}"
    shutil.rmtree(base, ignore_errors=True)
    half, task = args.steps // 2, KDTask(hard_full=0.0)
    q4 = lm_train(cache=args.cache, out=base / "q4", train=train_config(half, args.lr), batch_size=args.batch_size,
                  base="smollm2", quant=quant_config(name, mlp_bits=4), task=task, progress=False)  # fmt: skip
    res = {"q4_stage": measure(q4, base / "q4", held)}
    model, tok, _ = load_lut_model(base / "q4" / "model.safetensors")
    changed = to_target(model, quant_config(name))
    save_lut_model(base / "q4_to_q2.safetensors", model, base="smollm2", tokenizer_fp=tokenizer_fingerprint(tok))
    res["converted"] = {"layers": len(changed), "licence_perplexity": perplexity(model, held)["perplexity"]}
    del model
    q2 = lm_train(cache=args.cache, out=base / "q2", train=train_config(args.steps - half, args.lr),
                  batch_size=args.batch_size, start="v2", checkpoint=base / "q4_to_q2.safetensors", task=task,
                  progress=False)  # fmt: skip
    res["progressive"] = measure(q2, base / "q2", held)
    res["progressive"]["train_seconds"] += q4["seconds"]
    scratch = lm_train(cache=args.cache, out=base / "scratch", train=train_config(args.steps, args.lr),
                       batch_size=args.batch_size, base="smollm2", quant=quant_config(name), task=task,
                       progress=False)  # fmt: skip
    res["scratch"] = measure(scratch, base / "scratch", held)
    for sub in ("q4", "q2", "scratch"):
        shutil.rmtree(base / sub / "checkpoints", ignore_errors=True)
    return res


def table_and_plot(res: dict, png: Path) -> str:
    """A markdown table of every configuration measured so far, and bits per weight vs perplexity as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    float_ppl = res["float_licence_perplexity"]
    rows = ["| configuration | bits/weight | licence ppl (x float) | generated ppl | top-1 agreement | KL T=1 |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in sorted(res.get("configs", {}).items(), key=lambda kv: kv[1].get("bits_per_weight", 0)):
        if "bits_per_weight" not in r:
            continue
        rows.append(f"| {name} | {r['bits_per_weight']:.2f} | {r['licence_perplexity']:.1f} "
                    f"({r['licence_perplexity'] / float_ppl:.2f}x) | {r['generated_perplexity']:.1f} | "
                    f"{100 * r['top1_agreement']:.1f}% | {r['kl_t1']:.3f} |")  # fmt: skip
        ax.scatter(r["bits_per_weight"], r["licence_perplexity"])
        ax.annotate(name, (r["bits_per_weight"], r["licence_perplexity"]), fontsize=7)
    ax.axvline(2.6, ls="--", c="grey")
    ax.set(xlabel="bits per weight on disk (LUT layers)", ylabel="held-out licence perplexity",
           title=f"SmolLM2 LUT students after {res['steps']} KD steps (float {float_ppl:.1f})")  # fmt: skip
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="runs/bench_lm_teacher_text/cache", help="KD cache from lm_teacher_text.py")
    ap.add_argument("--work", default="runs/bench_lm_bits")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--held-windows", type=int, default=16, help="held-out licence windows of 256 tokens")
    ap.add_argument(
        "--progressive",
        choices=list(CONFIGS),
        default=None,
        help="instead of the sweep: progressive Q4 -> Q2 vs Q2 from the float model, equal steps",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    res = json.loads(path.read_text()) if path.exists() else {}
    res.update(command=" ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
               threads=args.threads, steps=args.steps)  # fmt: skip
    teacher, tok = load_causal_lm("smollm2")
    held = tokenize_corpus(read_texts([LICENCES / n for n in HELD_OUT]), tok, 256)[: args.held_windows]
    res["float_licence_perplexity"] = perplexity(teacher, held)["perplexity"]
    del teacher
    print(f"float: held-out licence perplexity {res['float_licence_perplexity']:.2f}", flush=True)
    todo = [args.progressive] if args.progressive else [c for c in args.configs if c not in res.get("configs", {})]
    for name in todo:
        t = time.perf_counter()
        out = run_progressive(args, name, held) if args.progressive else run_config(args, name, held)
        res.setdefault("configs", {})[name] = out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
        print(f"{name}: {json.dumps(out)[:400]} ({time.perf_counter() - t:.0f} s)", flush=True)
    if not args.progressive:
        print(table_and_plot(res, path.with_suffix(".png")))


if __name__ == "__main__":
    main()
