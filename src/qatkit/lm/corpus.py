"""Text corpora to fixed-length token windows: read .txt / .jsonl files, tokenize, split into train and eval."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

Document = str | list[dict[str, Any]]  # plain text, or a chat conversation: a list of {"role", "content"} dicts
_SUFFIXES = (".txt", ".jsonl")


def read_texts(paths: list[Path], text_field: str = "text") -> list[Document]:
    """Read documents from .txt files (one document each), .jsonl files (one per line) or folders of those."""
    docs: list[Document] = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
            if not files:
                raise ValueError(f"corpus folder {path} has no .txt or .jsonl files")
        elif path.is_file():  # a file named explicitly is plain text unless it is .jsonl (licence files have no suffix)
            files = [path]
        elif path.exists():  # a FIFO or device: never opened (it could block or never end)
            raise ValueError(f"corpus path {path} is not a regular file or folder")
        else:
            raise FileNotFoundError(f"corpus path {path} does not exist")
        for f in files:
            docs += read_jsonl(f, text_field) if f.suffix == ".jsonl" else [read_text_file(f)]
    docs = [d for d in docs if (d.strip() if isinstance(d, str) else d)]
    if not docs:
        raise ValueError(f"no non-empty documents in {', '.join(map(str, paths))}")
    return docs


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's content; ValueError naming the file and byte for anything else."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {path} is not UTF-8 text (byte {e.start}; give .txt or .jsonl files)") from None


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-empty line of a JSON Lines file; ValueError naming the line."""
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # an over-long integer, or nesting deeper than Python recurses
            raise ValueError(f"{path}:{n}: invalid JSON ({type(e).__name__})") from None


def read_jsonl(path: Path, text_field: str) -> list[Document]:
    """Documents of a JSON Lines file: a string ``text_field`` or a ``messages`` conversation per line."""
    docs: list[Document] = []
    for n, obj in json_lines(path):
        if isinstance(obj, dict) and isinstance(obj.get(text_field), str):
            docs.append(obj[text_field])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            docs.append(_check_messages(obj["messages"], f"{path}:{n}"))
        else:
            raise ValueError(f"{path}:{n}: expected an object with a string {text_field!r} field or a 'messages' list")
    return docs


def _check_messages(messages: list, where: str) -> list[dict[str, Any]]:
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: each message must be an object with string 'role' and 'content'")
    return messages


def tokenize_corpus(docs: list[Document], tokenizer: Any, seq_len: int, chat_template: bool = False) -> torch.Tensor:
    """Encode documents, join them with EOS and cut into non-overlapping (N, seq_len) int64 windows (tail dropped).

    Message lists (and plain text when ``chat_template``) go through ``tokenizer.apply_chat_template`` first;
    texts are encoded without added special tokens, so the template alone decides where BOS and the like go.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents with")
    texts = []
    for doc in docs:
        if isinstance(doc, list) or chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("the corpus needs a chat template but the tokenizer has none")
            messages = doc if isinstance(doc, list) else [{"role": "user", "content": doc}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            texts.append(doc)
    ids: list[int] = []
    for i, encoded in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        if i:
            ids.append(eos)
        ids += encoded
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def split_holdout(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) split of range(n); eval gets at least one index when eval_fraction > 0 and n >= 2."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, max(n - 1, 0))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])
