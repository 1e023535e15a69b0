"""Distillation text written by the teacher itself (data-free KD, as LLM-QAT does), and the fixed prompts whose
greedy answers show whether a quantized student still answers like its teacher.

Documents are sampled in blocks: block b uses the prompt ``prompts[b % len(prompts)]`` (or the BOS token alone)
and its own seed, so a block's documents never depend on the blocks before it. Each finished block is written
to ``generated.jsonl`` (atomically, with the settings in ``generated.json``): an interrupted generation resumes
after the last finished block and gives the same documents as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.io.jsonfile import read_json_object
from qatkit.lm.corpus import Document, json_lines, read_jsonl, read_text_file
from qatkit.lm.generate import generate_text, prompt_ids
from qatkit.lm.hf import tokenizer_fingerprint

GENERATED, GENERATION_SETTINGS, ANSWERS = "generated.jsonl", "generated.json", "teacher_answers.json"

CHECK_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "How many days are there in a week?",
    "What do bees make?",
    "Translate 'good morning' into French.",
    "What is 12 plus 7?",
)
"""Short questions with one right answer: the teacher's and the student's greedy answers are shown side by side."""


@dataclass
class GenerationConfig:
    """How the teacher writes distillation text."""

    documents: int
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    block: int = 8
    """Documents sampled together (one prompt, one seed)."""
    chat: bool = False
    """Prompts go through the chat template; documents are stored as user/assistant conversations."""
    prompts: list[str] = field(default_factory=list)
    """Empty: every document starts from the BOS token alone."""

    def __post_init__(self) -> None:
        if self.documents < 1 or self.max_new_tokens < 1 or self.block < 1:
            raise ValueError("documents, max_new_tokens and block must be >= 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.chat and not self.prompts:
            raise ValueError("chat-template generation needs prompts (--prompts FILE)")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl file (a "prompt" or "text" field per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist or is not a regular file")
    if path.suffix == ".jsonl":
        prompts = []
        for n, obj in json_lines(path):
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: expected an object with a string 'prompt' or 'text' field")
            prompts.append(text)
    else:
        prompts = read_text_file(path).splitlines()
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def _settings(cfg: GenerationConfig, teacher_name: str, tokenizer: Any) -> dict:
    s = asdict(cfg)
    s["prompts"] = hashlib.sha256(json.dumps(cfg.prompts).encode()).hexdigest()
    return {**s, "teacher": teacher_name, "tokenizer": tokenizer_fingerprint(tokenizer)}


def generate_documents(
    teacher: torch.nn.Module, tokenizer: Any, cfg: GenerationConfig, folder: str | Path, *, teacher_name: str,
    log: Callable[[str], Any] = print,
) -> list[Document]:  # fmt: skip
    """``cfg.documents`` documents sampled from ``teacher``, resumed from ``folder/generated.jsonl``; documents
    are plain text, or a user/assistant conversation when ``cfg.chat``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = _settings(cfg, teacher_name, tokenizer)
    docs = _resume(folder, settings)
    atomic_write_bytes(folder / GENERATION_SETTINGS, json.dumps(settings, indent=1).encode())
    blocks = -(-cfg.documents // cfg.block)
    if docs:
        log(f"teacher text: {len(docs)} of {cfg.documents} documents already written; resuming")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    teacher.eval()
    for b in range(len(docs) // cfg.block, blocks):
        prompt = cfg.prompts[b % len(cfg.prompts)] if cfg.prompts else None
        ids = prompt_ids(tokenizer, prompt, cfg.chat)
        k = min(cfg.block, cfg.documents - b * cfg.block)
        torch.manual_seed(cfg.seed * 1_000_003 + b)
        with torch.no_grad():
            out = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                   temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                   num_return_sequences=k, pad_token_id=pad)  # fmt: skip
        for row in out:
            text = tokenizer.decode(row[ids.shape[-1] :].tolist(), skip_special_tokens=True)
            if cfg.chat:
                docs.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": text}])
            else:
                docs.append((prompt + " " if prompt else "") + text)
        lines = [json.dumps({"messages": d} if isinstance(d, list) else {"text": d}) for d in docs]
        atomic_write_bytes(folder / GENERATED, ("\n".join(lines) + "\n").encode())
        log(f"teacher text: {len(docs)}/{cfg.documents} documents")
    return docs


def _resume(folder: Path, settings: dict) -> list[Document]:
    """Documents of finished blocks from an earlier run with the same settings; ValueError for other settings."""
    if not (folder / GENERATED).is_file():
        return []
    old = read_json_object(folder / GENERATION_SETTINGS, ValueError, "teacher-text settings")
    differ = [k for k in settings if old.get(k) != settings[k]]
    if differ:
        raise ValueError(f"{folder / GENERATED} was generated with other settings ({', '.join(differ)}); "
                         "use another folder")  # fmt: skip
    docs = read_jsonl(folder / GENERATED, "text")
    block = settings["block"]
    return docs[: len(docs) // block * block] if len(docs) < settings["documents"] else docs


def greedy_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[str], chat: bool,
                   max_new_tokens: int = 48) -> list[str]:  # fmt: skip
    """Each prompt answered greedily (the same decoding for teacher and student, so answers are comparable)."""
    chat = chat and bool(getattr(tokenizer, "chat_template", None))
    return [generate_text(model, tokenizer, p, max_tokens=max_new_tokens, temperature=0, repetition_penalty=1.0,
                          chat=chat).strip() for p in prompts]  # fmt: skip


def write_teacher_answers(folder: str | Path, prompts: list[str], answers: list[str], chat: bool) -> Path:
    path = Path(folder) / ANSWERS
    record = {"chat": chat, "prompts": prompts, "answers": answers}
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    return path


def read_teacher_answers(folder: str | Path) -> dict | None:
    """The teacher's answers stored beside a KD cache (None for a cache made without them)."""
    path = Path(folder) / ANSWERS
    if not path.is_file():
        return None
    rec = read_json_object(path, ValueError, "teacher answers")
    ok = (isinstance(rec.get("prompts"), list) and isinstance(rec.get("answers"), list)
          and len(rec["prompts"]) == len(rec["answers"]) and all(isinstance(x, str) for x in rec["prompts"] + rec["answers"]))  # fmt: skip
    if not ok:
        raise ValueError(f"{path}: expected 'prompts' and 'answers', two lists of strings of the same length")
    return rec


def mix_windows(generated: torch.Tensor | None, corpus: torch.Tensor | None, share: float) -> tuple[torch.Tensor, dict]:
    """Token windows from teacher text and from files, ``share`` of them generated (the larger side is cut to
    that ratio; either side may be absent); returns the windows, generated first, and the count per source."""
    if generated is None or corpus is None:
        only = generated if generated is not None else corpus
        if only is None:
            raise ValueError("no windows: give a corpus, --generate N, or both")
        return only, {"generated" if generated is not None else "corpus": len(only)}
    if not 0 < share < 1:
        raise ValueError(f"the generated share must be in (0, 1) when mixing with a corpus, got {share}")
    n_gen, n_cor = len(generated), len(corpus)
    if n_gen / (n_gen + n_cor) > share:
        n_gen = max(1, round(share / (1 - share) * n_cor))
    else:
        n_cor = max(1, round((1 - share) / share * n_gen))
    return torch.cat([generated[:n_gen], corpus[:n_cor]]), {"generated": n_gen, "corpus": n_cor}
