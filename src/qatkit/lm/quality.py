"""How good a quantized language model is beyond perplexity: agreement with its teacher on held-out text (per
source of the KD cache), a health verdict with thresholds, and the teacher's and the student's greedy answers to
fixed prompts side by side - written to ``summary.json`` and ``report.md`` of an ``lm-train`` run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qatkit.io.checkpoint import atomic_write_bytes

HEALTH = {"kl_t1": 0.3, "top1_agreement": 0.85}
"""Health thresholds (ANEMLL's): KL(teacher || student) at T=1 below 0.3 and the teacher's top-1 token kept on
more than 85% of held-out positions."""


def health(metrics: dict[str, float]) -> dict[str, Any]:
    """The verdict on evaluation ``metrics`` (a KD evaluation: ``kl_t1``, ``top1_agreement``)."""
    kl, top1 = metrics.get("kl_t1"), metrics.get("top1_agreement")
    failed = []
    if kl is None or not kl < HEALTH["kl_t1"]:
        failed.append(f"KL at T=1 {kl if kl is None else f'{kl:.3f}'} (limit < {HEALTH['kl_t1']})")
    if top1 is None or not top1 > HEALTH["top1_agreement"]:
        failed.append(f"teacher top-1 agreement {top1 if top1 is None else f'{top1:.1%}'} "
                      f"(limit > {HEALTH['top1_agreement']:.0%})")  # fmt: skip
    return {"verdict": "healthy" if not failed else "degraded", "failed": failed, "thresholds": HEALTH,
            "kl_t1": kl, "top1_agreement": top1}  # fmt: skip


def side_by_side(prompts: list[str], teacher: list[str], student: list[str]) -> list[dict[str, str]]:
    return [{"prompt": p, "teacher": t, "student": s} for p, t, s in zip(prompts, teacher, student, strict=True)]


METRICS = (("perplexity", "perplexity", ".2f"), ("kl_t1", "KL (T=1)", ".4f"), ("kl", "KL (training T, ×T²)", ".4f"),
           ("top1_agreement", "teacher top-1 agreement", ".2%"), ("loss", "KD loss", ".4f"))  # fmt: skip


def write_lm_report(out: Path, summary: dict) -> Path:
    """``out/report.md``: what was trained, held-out quality per source, the health verdict and the answers."""
    bits = summary.get("bits") or {}
    lines = [f"# lm-train report: {summary.get('base', '')}", "",
             f"Start: {summary.get('start')}; {summary.get('train_sequences')} training and "
             f"{summary.get('eval_sequences')} held-out windows; {summary.get('total_seconds', 0):.0f} s.",
             f"Bits per weight of the quantized layers: {bits.get('bits_per_weight', float('nan')):.3f}." if bits
             else "", _memory(summary), "", "## Held-out quality (best weights)", ""]  # fmt: skip
    per = summary.get("eval_by_source") or {}
    cols = list(per)
    lines += ["| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for key, title, fmt in METRICS:
        cells = [format(per[c][key], fmt) if isinstance(per[c].get(key), (int, float)) else "" for c in cols]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    h = summary.get("health")
    if h:
        where = h.get("source", "")
        lines += ["", "## Health", "", f"**{h['verdict']}** on held-out {where} text (thresholds: KL at T=1 < "
                  f"{h['thresholds']['kl_t1']}, teacher top-1 agreement > {h['thresholds']['top1_agreement']:.0%})"
                  + ("." if not h["failed"] else ": " + "; ".join(h["failed"]) + ".")]  # fmt: skip
    answers = summary.get("answers") or []
    if answers:
        lines += ["", "## Greedy answers, teacher and student", "", "| prompt | teacher | student |", "|---|---|---|"]
        for a in answers:
            lines.append(f"| {_cell(a['prompt'])} | {_cell(a['teacher'])} | {_cell(a['student'])} |")
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _memory(summary: dict) -> str:
    est, peak = summary.get("memory_estimate"), summary.get("peak_rss_bytes")
    if not est or not peak:
        return ""
    return (f"Memory: estimated {est['total'] / 2**30:.2f} GiB before activations; peak resident set "
            f"{peak / 2**30:.2f} GiB.")  # fmt: skip
