"""KD-QAT of SmolLM2-135M to Q2_A4 LUT weights on CPU: held-out perplexity of float, PTQ and KD-QAT (issue 4).

Corpus: the licence texts in /usr/share/common-licenses. GFDL-1.2, GFDL-1.3, MPL-1.1 and MPL-2.0 are held out
for perplexity (sequence length 256, as in ../shared/notes/offline-data-and-models.md); the others feed the KD
cache. Steps: cache -> float ppl -> PTQ (nearest LUT, no training) ppl -> KD-QAT for --steps -> FP16 snap and
packed checkpoint ppl, bits per weight and file size. Writes a JSON with every number and the command.

    .venv/bin/python bench/lm_kd.py --steps 150 --json bench/results/lm_kd.json
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from qatkit.lm.cache import build_kd_cache
from qatkit.lm.corpus import read_texts, tokenize_corpus
from qatkit.lm.hf import load_causal_lm
from qatkit.lm.kd_task import KDTask
from qatkit.lm.pack import load_packed, save_packed, snap_model
from qatkit.lm.perplexity import perplexity
from qatkit.lm.rules import LMQuantConfig, bits_per_weight, prepare_lm
from qatkit.lm.train import lm_train
from qatkit.train.config import TrainConfig

LICENCES = Path("/usr/share/common-licenses")
HELD_OUT = ["GFDL-1.2", "GFDL-1.3", "MPL-1.1", "MPL-2.0"]
HELD_OUT_MARKERS = re.compile(r"Free Documentation License|\bGFDL\b|Mozilla Public License|\bMPL\b")


def copyright_files() -> list[Path]:
    """Debian's per-package copyright files, deduplicated, without any that mention a held-out licence."""
    seen, out = set(), []
    for p in sorted(Path("/usr/share/doc").glob("*/copyright")):
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if HELD_OUT_MARKERS.search(text) or hash(text) in seen:
            continue
        seen.add(hash(text))
        out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench_lm_kd", help="folder for the cache, run and packed files")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--negatives", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--hard-full", type=float, default=0.0)
    ap.add_argument("--preset", default="Q2_A4")
    ap.add_argument("--eval-windows", type=int, default=0, help="use only the first N held-out windows (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--corpus",
        choices=["licences", "licences+copyright"],
        default="licences",
        help="KD corpus: the licence texts not held out, plus (licences+copyright) the Debian "
        "/usr/share/doc/*/copyright files that do not mention a held-out licence",
    )
    ap.add_argument("--max-sequences", type=int, default=0, help="cap on KD cache windows (0: all)")
    ap.add_argument("--no-normalizer-grad", action="store_true", help="rules with normalizer_grad: false")
    ap.add_argument("--reuse-run", action="store_true", help="skip training if WORK/run/summary.json exists")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    res: dict = {"command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
                 "threads": args.threads, "args": vars(args)}  # fmt: skip
    t0 = time.perf_counter()

    teacher, tok = load_causal_lm("smollm2")
    train_files = sorted(p for p in LICENCES.iterdir() if p.is_file() and not p.is_symlink() and p.name not in HELD_OUT)
    if args.corpus == "licences+copyright":
        train_files += copyright_files()
    held = tokenize_corpus(read_texts([LICENCES / n for n in HELD_OUT]), tok, 256)
    if args.eval_windows:
        held = held[: args.eval_windows]
    cache = work / f"cache_{args.corpus}_L{args.seq_len}_K{args.top_k}_R{args.negatives}_N{args.max_sequences}"
    seqs = tokenize_corpus(read_texts(train_files), tok, args.seq_len)
    if args.max_sequences:
        seqs = seqs[: args.max_sequences]
    t = time.perf_counter()
    build_kd_cache(teacher, tok, seqs, cache, teacher_name="smollm2", top_k=args.top_k, negatives=args.negatives,
                   eval_fraction=0.05)  # fmt: skip
    res["cache"] = {"sequences": len(seqs), "seq_len": args.seq_len, "seconds": time.perf_counter() - t,
                    "train_files": len(train_files), "held_out": HELD_OUT}  # fmt: skip

    def score(name: str, model) -> None:
        t = time.perf_counter()
        r = perplexity(model, held)
        res[name] = {**r, "eval_seconds": time.perf_counter() - t}
        print(f"{name:>10}: perplexity {r['perplexity']:.2f} on {r['tokens']} held-out tokens", flush=True)

    score("float", teacher)
    quant = LMQuantConfig(preset=args.preset)
    if args.no_normalizer_grad:
        quant = LMQuantConfig(preset=None, rules=[r.model_copy(update={"normalizer_grad": False})
                                                  for r in quant.resolved_rules()])  # fmt: skip
    prepare_lm(teacher, quant)
    res["bits"] = bits_per_weight(teacher)
    score("ptq", teacher)
    del teacher

    cfg = TrainConfig(epochs=1000, max_steps=args.steps, lr=args.lr, schedule="cosine", warmup_epochs=0.1,
                      weight_decay=0.0, grad_clip=1.0, logging={"step_csv": True, "quantizer_stats": False})  # fmt: skip
    run = work / ("run_nograd" if args.no_normalizer_grad else "run")
    if args.reuse_run and (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
    else:
        summary = lm_train(cache=cache, out=run, train=cfg, batch_size=args.batch_size, base="smollm2", quant=quant,
                           task=KDTask(hard_full=args.hard_full), progress=False)  # fmt: skip
    res["train"] = {k: summary[k] for k in ("steps", "seconds", "best_epoch", "best_metrics", "first_eval")}
    res["train"]["seconds_per_step"] = summary["seconds"] / max(summary["steps"], 1)
    from qatkit.lm.checkpoint import load_lut_model

    student, tok, _ = load_lut_model(run / "model.safetensors")
    score("kd_qat", student)
    snap_model(student)
    score("kd_qat_fp16", student)
    res["pack"] = save_packed(work / "packed", student, base="smollm2", tokenizer=tok)
    loaded, _ = load_packed(work / "packed")
    score("packed", loaded)
    res["total_seconds"] = time.perf_counter() - t0
    print(json.dumps({k: res[k] for k in ("bits", "pack")}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
