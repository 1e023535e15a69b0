"""The knowledge-distillation cache: a teacher's top-K logits (plus sampled negatives) per position, on disk.

Layout of a cache folder: ``manifest.json`` and, per shard of up to ``shard_size`` sequences, five ``.npy`` files
``shard_00000.{input_ids,topk_ids,topk_logits,neg_ids,neg_logits}.npy``. Position t of ``topk_*`` / ``neg_*``
holds the teacher's view of token t+1 given tokens 0..t. Shards are written under temporary names and renamed
when complete; the manifest lists finished shards only, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from qatkit.io.checkpoint import atomic_write_bytes
from qatkit.lm.corpus import split_holdout
from qatkit.lm.hf import tokenizer_fingerprint

FORMAT = "qatkit-kd-cache"
VERSION = 1
MANIFEST = "manifest.json"
FIELDS = ("input_ids", "topk_ids", "topk_logits", "neg_ids", "neg_logits")
SETTINGS = (
    "seq_len",
    "top_k",
    "negatives",
    "teacher",
    "tokenizer",
    "vocab_size",
    "num_sequences",
    "shard_size",
    "seed",
    "eval_fraction",
    "sequences_sha256",
)
_INT_KEYS = ("seq_len", "top_k", "negatives", "vocab_size", "num_sequences", "shard_size", "seed")


class CacheError(ValueError):
    """A KD cache that is missing, foreign, incomplete, corrupt, or made with other settings or another tokenizer."""


def shard_name(index: int) -> str:
    """The file-name stem of shard ``index``."""
    return f"shard_{index:05d}"


def estimate_cache_bytes(num_sequences: int, L: int, K: int, R: int) -> int:
    """Bytes of array data a cache of ``num_sequences`` windows of length L with K top ids and R negatives takes."""
    return num_sequences * (4 * L + (L - 1) * (K + R) * (4 + 2))


def _array_specs(n: int, L: int, K: int, R: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {
        "input_ids": ((n, L), np.dtype(np.int32)),
        "topk_ids": ((n, L - 1, K), np.dtype(np.int32)),
        "topk_logits": ((n, L - 1, K), np.dtype(np.float16)),
        "neg_ids": ((n, L - 1, R), np.dtype(np.int32)),
        "neg_logits": ((n, L - 1, R), np.dtype(np.float16)),
    }


def _shard_rows(manifest: dict[str, Any], index: int) -> int:
    return min(manifest["shard_size"], manifest["num_sequences"] - index * manifest["shard_size"])


def _num_shards(manifest: dict[str, Any]) -> int:
    return -(-manifest["num_sequences"] // manifest["shard_size"])


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load and check ``folder/manifest.json``; CacheError if it is missing, corrupt or not a qatkit KD cache."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CacheError(f"no KD cache at {folder}: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"corrupt KD cache manifest {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a qatkit KD cache manifest (format should be {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise CacheError(
            f"{path} has KD cache version {manifest.get('version')!r}; this qatkit reads version {VERSION}"
        )
    missing = [k for k in (*SETTINGS, "shards", "eval_sequences") if k not in manifest]
    if missing:
        raise CacheError(f"corrupt KD cache manifest {path}: missing keys {', '.join(missing)}")
    bad = [k for k in _INT_KEYS if not isinstance(manifest[k], int) or isinstance(manifest[k], bool)]
    if bad or manifest["seq_len"] < 2 or manifest["top_k"] < 1 or manifest["shard_size"] < 1:
        raise CacheError(f"corrupt KD cache manifest {path}: bad values for {', '.join(bad) or 'sizes'}")
    if not isinstance(manifest["shards"], list) or not isinstance(manifest["eval_sequences"], list):
        raise CacheError(f"corrupt KD cache manifest {path}: 'shards' and 'eval_sequences' must be lists")
    return manifest


def _vocab_size(teacher: torch.nn.Module) -> int:
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = getattr(teacher, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    raise ValueError("cannot tell the teacher's vocabulary size (no output embeddings and no config.vocab_size)")


def _teacher_logits(teacher: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = teacher(input_ids=ids, use_cache=False) if hasattr(teacher, "config") else teacher(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def _sample_negatives(top_ids: torch.Tensor, vocab: int, R: int, gen: torch.Generator) -> torch.Tensor:
    """R distinct ids per row, uniform over the vocabulary minus that row's (distinct) top ids; all on CPU."""
    rows, K = top_ids.shape
    # The u-th id not among sorted s_0 < s_1 < ... is u + #{j : s_j - j <= u}.
    shifted = top_ids.sort(dim=-1).values - torch.arange(K)
    u = torch.randint(vocab - K, (rows, R), generator=gen)
    while R > 1:
        sorted_u, order = u.sort(dim=-1)
        dup_sorted = torch.zeros_like(u, dtype=torch.bool)
        dup_sorted[:, 1:] = sorted_u[:, 1:] == sorted_u[:, :-1]
        if not dup_sorted.any():
            break
        dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)
        u[dup] = torch.randint(vocab - K, (int(dup.sum()),), generator=gen)
    return u + torch.searchsorted(shifted.contiguous(), u.contiguous(), right=True)


def _shard_generator(seed: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _build_shard(
    teacher: torch.nn.Module,
    sequences: torch.Tensor,
    folder: Path,
    manifest: dict[str, Any],
    index: int,
    batch_size: int,
    device: torch.device,
) -> None:
    L, K, R, V = manifest["seq_len"], manifest["top_k"], manifest["negatives"], manifest["vocab_size"]
    start, n = index * manifest["shard_size"], _shard_rows(manifest, index)
    stem = shard_name(index)
    parts = {f: folder / f"{stem}.{f}.npy.partial" for f in FIELDS}
    arrays = {
        f: np.lib.format.open_memmap(parts[f], mode="w+", dtype=dtype, shape=shape)
        for f, (shape, dtype) in _array_specs(n, L, K, R).items()
    }
    gen = _shard_generator(manifest["seed"], index)
    arrays["input_ids"][:] = sequences[start : start + n].numpy().astype(np.int32)
    for b in range(0, n, batch_size):
        ids = sequences[start + b : start + min(b + batch_size, n)]
        logits = _teacher_logits(teacher, ids.to(device))[:, :-1]
        if logits.shape[-1] != V:
            raise ValueError(f"teacher gave {logits.shape[-1]} logits per position, expected vocab size {V}")
        top_vals, top_ids = logits.topk(K, dim=-1)
        rows = slice(b, b + ids.shape[0])
        arrays["topk_ids"][rows] = top_ids.cpu().numpy().astype(np.int32)
        arrays["topk_logits"][rows] = top_vals.cpu().numpy().astype(np.float16)
        if R:
            neg_ids = _sample_negatives(top_ids.cpu().reshape(-1, K), V, R, gen).view(*top_ids.shape[:2], R)
            arrays["neg_ids"][rows] = neg_ids.numpy().astype(np.int32)
            arrays["neg_logits"][rows] = logits.gather(-1, neg_ids.to(device)).cpu().numpy().astype(np.float16)
    for arr in arrays.values():
        arr.flush()
    arrays.clear()  # drop the memory maps before renaming
    for f, part in parts.items():
        part.replace(folder / f"{stem}.{f}.npy")


def build_kd_cache(
    teacher: torch.nn.Module,
    tokenizer: Any,
    sequences: torch.Tensor,
    out_dir: str | Path,
    *,
    teacher_name: str,
    top_k: int,
    negatives: int,
    shard_size: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    eval_fraction: float = 0.1,
    log: Callable[[str], Any] = print,
) -> Path:
    """Run the teacher over ``sequences`` (N, L) and cache its top-K and sampled negative logits in ``out_dir``.

    Resumable: finished shards of a cache with the same settings are kept; other settings raise CacheError.
    Batches never straddle shards, so shard s depends only on its own sequences and on (seed, s).
    """
    if sequences.ndim != 2 or sequences.dtype.is_floating_point or sequences.dtype.is_complex:
        raise ValueError(f"sequences must be an (N, L) integer tensor, got {tuple(sequences.shape)} {sequences.dtype}")
    N, L = sequences.shape
    if N < 1 or L < 2:
        raise ValueError(f"need at least one sequence of length >= 2, got {N} of length {L}")
    if top_k < 1 or negatives < 0 or shard_size < 1 or batch_size < 1:
        raise ValueError("top_k, shard_size and batch_size must be >= 1 and negatives >= 0")
    vocab = _vocab_size(teacher)
    if top_k + negatives > vocab:
        raise ValueError(f"top_k + negatives = {top_k + negatives} exceeds the teacher's vocabulary of {vocab}")
    if int(sequences.min()) < 0 or int(sequences.max()) >= vocab:
        raise ValueError(f"sequences hold token ids outside the teacher's vocabulary [0, {vocab})")
    sequences = sequences.detach().to("cpu", torch.int64).contiguous()
    _, eval_ids = split_holdout(N, eval_fraction, seed)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "seq_len": L,
        "top_k": top_k,
        "negatives": negatives,
        "teacher": teacher_name,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab,
        "num_sequences": N,
        "shard_size": shard_size,
        "seed": seed,
        "eval_fraction": eval_fraction,
        "sequences_sha256": hashlib.sha256(sequences.numpy().tobytes()).hexdigest(),
        "dtype": "float16",
        "shards": [],
        "eval_sequences": eval_ids,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST).exists():
        old = read_manifest(out_dir)
        differ = [k for k in SETTINGS if old[k] != manifest[k]]
        if differ:
            raise CacheError(
                f"{out_dir} holds a KD cache made with other settings ({', '.join(differ)}); use another folder"
            )
        manifest["shards"] = [s for s in old["shards"] if all((out_dir / f"{s}.{f}.npy").is_file() for f in FIELDS)]
    n_shards = _num_shards(manifest)
    todo = [s for s in range(n_shards) if shard_name(s) not in manifest["shards"]]
    mib = estimate_cache_bytes(N, L, top_k, negatives) / 2**20
    log(
        f"KD cache {out_dir}: {N} x {L} tokens, top-{top_k} + {negatives} negatives, about {mib:.1f} MiB; "
        f"{len(todo)} of {n_shards} shards to compute"
    )
    _write_manifest(out_dir, manifest)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.inference_mode():
            for s in todo:
                _build_shard(teacher, sequences, out_dir, manifest, s, batch_size, device)
                manifest["shards"] = sorted({*manifest["shards"], shard_name(s)})
                _write_manifest(out_dir, manifest)
                log(f"KD cache: shard {s + 1}/{n_shards} done")
    finally:
        teacher.train(was_training)
    return out_dir


class KDCache(Dataset):
    """A torch Dataset over a finished KD cache (memory-mapped shards); ``split`` is "train", "eval" or "all"."""

    def __init__(self, folder: str | Path, tokenizer: Any = None, split: str = "train"):
        self.folder = Path(folder)
        self._manifest = read_manifest(self.folder)
        m = self._manifest
        if tokenizer is not None:
            fp = tokenizer_fingerprint(tokenizer)
            if fp != m["tokenizer"]:
                raise CacheError(
                    f"the KD cache at {folder} was made with another tokenizer (cache {m['tokenizer']}, given {fp})"
                )
        expected = [shard_name(s) for s in range(_num_shards(m))]
        if sorted(m["shards"]) != expected:
            raise CacheError(
                f"the KD cache at {folder} is incomplete ({len(m['shards'])} of {len(expected)} shards); "
                "rerun the build to finish it"
            )
        eval_ids = m["eval_sequences"]
        if not all(isinstance(i, int) and 0 <= i < m["num_sequences"] for i in eval_ids):
            raise CacheError(f"corrupt KD cache manifest in {folder}: eval_sequences out of range")
        if split == "eval":
            self.indices = sorted(eval_ids)
        elif split == "train":
            held = set(eval_ids)
            self.indices = [i for i in range(m["num_sequences"]) if i not in held]
        elif split == "all":
            self.indices = list(range(m["num_sequences"]))
        else:
            raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
        self.split = split
        self._arrays: list[dict[str, np.ndarray]] | None = self._open()

    def _open(self) -> list[dict[str, np.ndarray]]:
        m = self._manifest
        shards = []
        for s in range(_num_shards(m)):
            specs = _array_specs(_shard_rows(m, s), m["seq_len"], m["top_k"], m["negatives"])
            arrays = {}
            for f, (shape, dtype) in specs.items():
                path = self.folder / f"{shard_name(s)}.{f}.npy"
                if not path.is_file():
                    raise CacheError(f"KD cache file {path} is missing")
                try:
                    arr = np.load(path, mmap_mode="r")
                except (ValueError, OSError) as e:
                    raise CacheError(f"KD cache file {path} is unreadable: {e}") from None
                if arr.shape != shape or arr.dtype != dtype:
                    raise CacheError(f"KD cache file {path} is {arr.shape} {arr.dtype}, expected {shape} {dtype}")
                arrays[f] = arr
            shards.append(arrays)
        return shards

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def seq_len(self) -> int:
        return self._manifest["seq_len"]

    @property
    def top_k(self) -> int:
        return self._manifest["top_k"]

    @property
    def negatives(self) -> int:
        return self._manifest["negatives"]

    @property
    def vocab_size(self) -> int:
        return self._manifest["vocab_size"]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._arrays is None:
            self._arrays = self._open()
        shard, row = divmod(self.indices[i], self._manifest["shard_size"])
        arrays = self._arrays[shard]
        out = {}
        for f in FIELDS:
            dtype = np.float32 if f.endswith("logits") else np.int64
            out[f] = torch.from_numpy(np.array(arrays[f][row], dtype=dtype))
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None  # memory maps are reopened in the receiving process
        return state
