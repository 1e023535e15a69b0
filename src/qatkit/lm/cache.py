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
from qatkit.io.jsonfile import read_json_object
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
_MINIMA = {"seq_len": 2, "top_k": 1, "negatives": 0, "vocab_size": 1, "num_sequences": 1, "shard_size": 1}
_STR_KEYS = ("teacher", "tokenizer", "sequences_sha256")
SPLITS = ("train", "eval", "all")
_CHECK_ROWS = 64


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
    if not path.exists():
        raise CacheError(f"no KD cache at {folder}: {MANIFEST} is missing")
    manifest = read_json_object(path, CacheError, "a KD cache manifest")
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a qatkit KD cache manifest (format should be {FORMAT!r})")
    if type(manifest.get("version")) is not int or manifest["version"] != VERSION:
        raise CacheError(
            f"{path} has KD cache version {manifest.get('version')!r}; this qatkit reads version {VERSION}"
        )
    missing = [k for k in (*SETTINGS, "shards", "eval_sequences") if k not in manifest]
    if missing:
        raise CacheError(f"corrupt KD cache manifest {path}: missing keys {', '.join(missing)}")
    problem = _manifest_problem(manifest)
    if problem:
        raise CacheError(f"corrupt KD cache manifest {path}: {problem}")
    return manifest


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with the manifest's values (types, ranges), or None: nothing later indexes with bad numbers."""
    for k in _INT_KEYS:
        if type(m[k]) is not int:
            return f"{k!r} must be an integer, got {m[k]!r}"
    for k, low in _MINIMA.items():
        if m[k] < low:
            return f"{k!r} must be >= {low}, got {m[k]}"
    if m["top_k"] + m["negatives"] > m["vocab_size"]:
        return f"top_k + negatives = {m['top_k'] + m['negatives']} exceeds vocab_size {m['vocab_size']}"
    for k in _STR_KEYS:
        if not isinstance(m[k], str):
            return f"{k!r} must be a string, got {m[k]!r}"
    if type(m["eval_fraction"]) not in (int, float) or not 0 <= m["eval_fraction"] < 1:
        return f"'eval_fraction' must be a number in [0, 1), got {m['eval_fraction']!r}"
    if m.get("dtype", "float16") != "float16":
        return f"'dtype' must be 'float16', got {m['dtype']!r}"
    if not isinstance(m["shards"], list) or not all(isinstance(x, str) for x in m["shards"]):
        return "'shards' must be a list of shard names"
    ev, n = m["eval_sequences"], m["num_sequences"]
    if not isinstance(ev, list) or not all(type(i) is int and 0 <= i < n for i in ev):
        return f"'eval_sequences' must be a list of sequence numbers in [0, {n})"
    src = m.get("sources", [["all", n]])
    if not (isinstance(src, list) and all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], str)
                                          and type(x[1]) is int and x[1] >= 0 for x in src)
            and sum(x[1] for x in src) == n):  # fmt: skip
        return f"'sources' must be a list of [name, count] pairs whose counts add up to {n}"
    return None


def source_ranges(manifest: dict[str, Any]) -> dict[str, range]:
    """Where each source's sequences lie (a cache built from one corpus has one source, "all")."""
    out, start = {}, 0
    for name, count in manifest.get("sources", [["all", manifest["num_sequences"]]]):
        out[name] = range(start, start + count)
        start += count
    return out


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
    sources: dict[str, int] | None = None,
    log: Callable[[str], Any] = print,
) -> Path:
    """Run the teacher over ``sequences`` (N, L) and cache its top-K and sampled negative logits in ``out_dir``;
    ``sources`` names consecutive runs of sequences (e.g. {"generated": 300, "corpus": 200}) for per-source
    evaluation.

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
        "sources": [[k, int(v)] for k, v in (sources or {"all": N}).items()],
    }
    if sum(v for _, v in manifest["sources"]) != N:
        raise ValueError(f"sources {sources} do not add up to the {N} sequences")
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
    """A torch Dataset over a finished KD cache (memory-mapped shards); ``split`` is "train", "eval" or "all".

    Opening checks every shard file (shape, dtype, token ids within the vocabulary, finite logits); with
    ``model`` (the student), its vocabulary must be the cache's.
    """

    def __init__(
        self, folder: str | Path, tokenizer: Any = None, split: str = "train", model: Any = None,
        source: str | None = None,
    ):  # fmt: skip
        """``source``: only the sequences of that source (see :func:`source_ranges`)."""
        if split not in SPLITS:
            raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
        self.folder = Path(folder)
        self._manifest = m = read_manifest(self.folder)
        self._check_users(tokenizer, model)
        self._check_shard_list()
        self._arrays: list[dict[str, np.ndarray]] | None = self._open(check=True)
        self.split = split
        held = set(m["eval_sequences"])
        if split == "eval":
            self.indices = sorted(held)
        else:
            self.indices = [i for i in range(m["num_sequences"]) if split == "all" or i not in held]
        if source is not None:
            ranges = source_ranges(m)
            if source not in ranges:
                raise CacheError(f"the KD cache at {self.folder} has no source {source!r} (it has "
                                 f"{', '.join(ranges)})")  # fmt: skip
            self.indices = [i for i in self.indices if i in ranges[source]]

    def _check_users(self, tokenizer: Any, model: Any) -> None:
        """Refuse a tokenizer other than the cache's, and a model whose vocabulary is not the cache's."""
        m = self._manifest
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != m["tokenizer"]:
            raise CacheError(f"the KD cache at {self.folder} was made with another tokenizer (cache {m['tokenizer']}, "
                             f"given {tokenizer_fingerprint(tokenizer)})")  # fmt: skip
        if model is not None and _vocab_size(model) != m["vocab_size"]:
            raise CacheError(f"the KD cache at {self.folder} holds teacher logits over {m['vocab_size']} token ids, "
                             f"but the model has {_vocab_size(model)} output logits (another vocabulary)")  # fmt: skip

    def _check_shard_list(self) -> None:
        """Refuse a manifest listing fewer shards than its sequences need (unfinished) or other names (corrupt)."""
        listed, n = self._manifest["shards"], _num_shards(self._manifest)
        if len(listed) < n:
            raise CacheError(
                f"the KD cache at {self.folder} is incomplete ({len(listed)} of {n} shards); "
                "rerun the build to finish it"
            )
        if sorted(listed) != [shard_name(s) for s in range(len(listed))] or len(listed) != n:
            raise CacheError(f"corrupt KD cache manifest {self.folder / MANIFEST}: 'shards' should be {shard_name(0)} "
                             f"to {shard_name(n - 1)}")  # fmt: skip

    def _open(self, check: bool = False) -> list[dict[str, np.ndarray]]:
        m = self._manifest
        shards = []
        for s in range(_num_shards(m)):
            specs = _array_specs(_shard_rows(m, s), m["seq_len"], m["top_k"], m["negatives"])
            shards.append({f: self._load(s, f, shape, dtype, check) for f, (shape, dtype) in specs.items()})
        return shards

    def _load(self, shard: int, field: str, shape: tuple[int, ...], dtype: np.dtype, check: bool) -> np.ndarray:
        """One shard array, memory-mapped; CacheError unless a regular .npy file of that shape and dtype."""
        path = self.folder / f"{shard_name(shard)}.{field}.npy"
        if not path.is_file():  # a FIFO is never opened (it would block)
            raise CacheError(f"KD cache file {path} is {'missing' if not path.exists() else 'not a regular file'}")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # numpy raises several types for a bad header or a short file
            raise CacheError(f"KD cache file {path} is unreadable: {str(e).splitlines()[0][:200]}") from None
        if not isinstance(arr, np.ndarray):
            raise CacheError(f"KD cache file {path} is not a .npy array")
        if arr.shape != shape or arr.dtype != dtype:
            raise CacheError(f"KD cache file {path} is {arr.shape} {arr.dtype}, expected {shape} {dtype}")
        if check:
            _check_values(path, field, arr, self._manifest["vocab_size"])
        return arr

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
            self._arrays = self._open()  # checked when the dataset was made
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


def _check_values(path: Path, field: str, arr: np.ndarray, vocab: int) -> None:
    """Refuse NaN/inf teacher logits and token ids outside [0, vocab), naming the file and the first bad entry."""
    logits = field.endswith("logits")
    for start in range(0, arr.shape[0], _CHECK_ROWS):
        block = np.asarray(arr[start : start + _CHECK_ROWS])
        bad = ~np.isfinite(block) if logits else (block < 0) | (block >= vocab)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            what = "non-finite teacher logit" if logits else f"token id outside the vocabulary [0, {vocab}):"
            raise CacheError(f"KD cache file {path}: {what} {block[at]} at index {(start + at[0], *at[1:])}")
