"""KD-QAT of SmolLM2-135M to Q2_A4 on text the teacher wrote itself: does the 2-bit student still answer?

The teacher (SmolLM2-135M-Instruct) answers templated questions through its chat template (capitals, sums,
colours, opposites, units, one-sentence descriptions; "the capital of France" is never asked, since it is one
of the check questions), sampled at temperature 1.0 / top-p 0.95; those conversations are mixed with the licence
texts (the four held-out licences excluded) at --share. lm-train then reports held-out quality per source (KL
at T=1, teacher top-1 agreement, perplexity) and the health verdict; the packed student answers the six check
questions greedily beside the teacher. Writes a JSON with every number and the command.

    .venv/bin/python bench/lm_teacher_text.py --documents 400 --steps 280 --json bench/results/lm_teacher_text.json
    .venv/bin/python bench/lm_teacher_text.py --documents 320 --cache-only   # the cache bench/lm_bits.py reads
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from qatkit.lm import teacher_data as td
from qatkit.lm.cache import build_kd_cache
from qatkit.lm.corpus import read_texts, tokenize_corpus
from qatkit.lm.hf import load_causal_lm
from qatkit.lm.kd_task import KDTask
from qatkit.lm.pack import load_packed, save_packed, snap_model
from qatkit.lm.perplexity import perplexity
from qatkit.lm.quality import side_by_side
from qatkit.lm.rules import LMQuantConfig, bits_per_weight, dequantize_lm
from qatkit.lm.train import lm_train
from qatkit.train.config import TrainConfig

LICENCES = Path("/usr/share/common-licenses")
HELD_OUT = ["GFDL-1.2", "GFDL-1.3", "MPL-1.1", "MPL-2.0"]
COUNTRIES = ["Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Brazil", "Kenya", "Norway", "Poland",
             "Portugal", "Greece", "Sweden", "India", "China", "Mexico", "Argentina", "Australia", "Ireland", "Peru",
             "Chile", "Austria", "Belgium", "Finland", "Denmark", "Turkey", "Russia", "Thailand", "Vietnam", "Cuba"]  # fmt: skip
THINGS = ["grass", "the sky", "snow", "a banana", "coal", "a tomato", "an orange", "milk", "a lemon", "the sea"]
WORDS = ["hot", "big", "fast", "happy", "early", "light", "open", "up", "full", "strong", "old", "wet"]
TOPICS = ["the moon", "a river", "winter", "a library", "coffee", "the ocean", "trains", "a forest", "music",
          "mountains", "bread", "rain", "a city at night", "cats", "the sun", "gardens"]  # fmt: skip
UNITS = [("minutes", "an hour"), ("hours", "a day"), ("months", "a year"), ("seconds", "a minute"),
         ("days", "a year"), ("centimetres", "a metre"), ("grams", "a kilogram"), ("legs", "a spider")]  # fmt: skip


def questions(seed: int = 0) -> list[str]:
    """Templated questions with short answers (never the check questions), shuffled."""
    rng = random.Random(seed)
    qs = [f"What is the capital of {c}?" for c in COUNTRIES]
    qs += [f"What language is spoken in {c}?" for c in COUNTRIES[:15]]
    qs += [f"What is {a} plus {b}?" for a, b in ((rng.randint(2, 40), rng.randint(2, 40)) for _ in range(20))]
    qs += [f"What colour is {t}?" for t in THINGS]
    qs += [f"What is the opposite of '{w}'?" for w in WORDS]
    qs += [f"Write one sentence about {t}." for t in TOPICS]
    qs += [f"How many {a} are there in {b}?" for a, b in UNITS]
    check = {q.lower() for q in td.CHECK_PROMPTS}
    qs = [q for q in dict.fromkeys(qs) if q.lower() not in check]
    rng.shuffle(qs)
    return qs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench_lm_teacher_text")
    ap.add_argument("--documents", type=int, default=400)
    ap.add_argument("--block", type=int, default=4, help="documents sampled per question")
    ap.add_argument("--gen-tokens", type=int, default=96)
    ap.add_argument("--share", type=float, default=0.5, help="share of generated windows in the KD cache")
    ap.add_argument("--steps", type=int, default=280)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--preset", default="Q2_A4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse-run", action="store_true", help="WORK/run finished: only snap, pack and measure")
    ap.add_argument("--cache-only", action="store_true", help="write the teacher text and KD cache, no training")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    res: dict = {"command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
                 "args": vars(args)}  # fmt: skip
    t0 = time.perf_counter()

    teacher, tok = load_causal_lm("smollm2")
    cache = work / "cache"
    held = tokenize_corpus(read_texts([LICENCES / n for n in HELD_OUT]), tok, 256)
    if args.reuse_run:
        res["float_licence_perplexity"] = perplexity(teacher, held)["perplexity"]
        answers = td.read_teacher_answers(cache)["answers"]
        summary = json.loads((work / "run" / "summary.json").read_text())
    else:
        answers = build_cache(args, teacher, tok, cache, held, res)
        if args.cache_only:
            print(json.dumps({k: res[k] for k in ("generation", "float_licence_perplexity")}, indent=1, default=str))
            return
        del teacher
        summary = train_student(args, cache)
    keys = ("steps", "seconds", "eval_by_source", "health", "answers", "bits", "memory_estimate", "peak_rss_bytes")
    res["train"] = {k: summary[k] for k in keys}
    from qatkit.lm.checkpoint import load_lut_model

    student, tok, _ = load_lut_model(work / "run" / "model.safetensors")
    snap_model(student)
    res["pack"] = save_packed(work / "packed", student, base="smollm2", tokenizer=tok)
    packed, _ = load_packed(work / "packed")
    res["packed_licence_perplexity"] = perplexity(packed, held)["perplexity"]
    res["bits"] = bits_per_weight(packed)
    dequantize_lm(packed)
    res["packed_answers"] = side_by_side(list(td.CHECK_PROMPTS), answers,
                                         td.greedy_answers(packed, tok, list(td.CHECK_PROMPTS), True))  # fmt: skip
    res["paris"] = "paris" in res["packed_answers"][0]["student"].lower()
    res["total_seconds"] = time.perf_counter() - t0
    for a in res["packed_answers"]:
        print(f"Q: {a['prompt']}\n  teacher: {a['teacher'][:120]!r}\n  student: {a['student'][:120]!r}")
    print(json.dumps({"health": summary["health"], "eval_by_source": summary["eval_by_source"],
                      "packed_licence_perplexity": res["packed_licence_perplexity"]}, indent=1))  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


def build_cache(args, teacher, tok, cache: Path, held, res: dict) -> list[str]:
    """Teacher text, the KD cache and the teacher's answers to the check questions (returned)."""
    qs = questions()
    cfg = td.GenerationConfig(args.documents, args.gen_tokens, 1.0, 0.95, seed=0, block=args.block, chat=True,
                              prompts=qs)  # fmt: skip
    t = time.perf_counter()
    docs = td.generate_documents(teacher, tok, cfg, cache, teacher_name="smollm2")
    res["generation"] = {"documents": len(docs), "questions": len(qs), "seconds": time.perf_counter() - t,
                         "example": docs[0]}  # fmt: skip
    generated = tokenize_corpus(docs, tok, args.seq_len, chat_template=True)
    files = sorted(p for p in LICENCES.iterdir() if p.is_file() and not p.is_symlink() and p.name not in HELD_OUT)
    licences = tokenize_corpus(read_texts(files), tok, args.seq_len)
    seqs, sources = td.mix_windows(generated, licences, args.share)
    t = time.perf_counter()
    build_kd_cache(teacher, tok, seqs, cache, teacher_name="smollm2", top_k=64, negatives=64, eval_fraction=0.1,
                   sources=sources)  # fmt: skip
    answers = td.greedy_answers(teacher, tok, list(td.CHECK_PROMPTS), True)
    td.write_teacher_answers(cache, list(td.CHECK_PROMPTS), answers, True)
    res["cache"] = {"sources": sources, "seconds": time.perf_counter() - t}
    res["float_licence_perplexity"] = perplexity(teacher, held)["perplexity"]
    print(f"float: held-out licence perplexity {res['float_licence_perplexity']:.2f}", flush=True)
    return answers


def train_student(args, cache: Path) -> dict:
    """lm-train of the preset from the float model on the cache; returns its summary."""
    train = TrainConfig(epochs=1000, max_steps=args.steps, lr=args.lr, schedule="cosine", warmup_epochs=0.1,
                        weight_decay=0.0, grad_clip=1.0, logging={"step_csv": True, "quantizer_stats": False})  # fmt: skip
    summary = lm_train(cache=cache, out=Path(args.work) / "run", train=train, batch_size=args.batch_size,
                       base="smollm2", quant=LMQuantConfig(preset=args.preset), task=KDTask(hard_full=0.0),
                       progress=False)  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
