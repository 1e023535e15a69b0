"""Every file the LM path reads is checked: a packed folder, a LUT checkpoint, a KD cache, a corpus and a quant
config made by the code, then corrupted one way at a time, each give one error line naming the file and the
problem (never a raw KeyError, IndexError, JSONDecodeError, UnicodeDecodeError or RecursionError)."""

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qatkit.base.config import RecipeError
from qatkit.io.checkpoint import CheckpointError, load_weights, read_metadata, save_weights
from qatkit.lm.cache import CacheError, KDCache, build_kd_cache
from qatkit.lm.checkpoint import apply_lut_checkpoint, save_lut_model
from qatkit.lm.corpus import read_texts, tokenize_corpus
from qatkit.lm.hf import load_causal_lm, tokenizer_fingerprint
from qatkit.lm.pack import apply_packed, save_packed
from qatkit.lm.rules import LMQuantConfig, LUTRule, lut_layers, prepare_lm
from qatkit.nn.lut_linear import LUTSpec
from tiny_lm import SAMPLE_TEXT

pytest.importorskip("transformers")

UP = "model.layers.0.mlp.up_proj"
L, K, R, SHARD = 8, 3, 2, 4


@pytest.fixture(scope="module")
def made(tiny_lm_dir, tmp_path_factory):
    """A 3-bit LUT checkpoint (3-bit codes when packed), its packed folder, and a two-shard KD cache."""
    root = tmp_path_factory.mktemp("lm_safety")
    model, tok = load_causal_lm(tiny_lm_dir)
    rule = LUTRule(name="up", match=["*.mlp.up_proj"], bits=3, rank=2, group_rows=1)
    prepare_lm(model, LMQuantConfig(preset=None, rules=[rule]))
    fp = tokenizer_fingerprint(tok)
    save_lut_model(root / "lut.safetensors", model, base=str(tiny_lm_dir), tokenizer_fp=fp)
    save_packed(root / "packed", model, base=str(tiny_lm_dir), tokenizer=tok)
    seqs = tokenize_corpus([SAMPLE_TEXT], tok, L)[:6]
    build_kd_cache(load_causal_lm(tiny_lm_dir)[0], tok, seqs, root / "kd", teacher_name="tiny", top_k=K,
                   negatives=R, shard_size=SHARD, log=lambda *_: None)  # fmt: skip
    return SimpleNamespace(root=root, base=tiny_lm_dir, fp=fp, tok=tok, vocab=model.config.vocab_size)


def fresh(made):
    return load_causal_lm(made.base)[0]


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _resave(path: Path, edit, meta_edit=None) -> None:
    """Change tensors (or metadata) and save through save_weights, so the content hash is valid again."""
    tensors, meta = load_weights(path), read_metadata(path)
    meta = {k: v for k, v in meta.items() if k not in ("format", "sha256")}
    edit(tensors)
    if meta_edit is not None:
        meta_edit(meta)
    save_weights(path, tensors, meta)


def _set(d: dict, keys: tuple, value) -> None:
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


# ---- packed folders ----------------------------------------------------------------------------------------
def packed_copy(made, tmp_path, config=None, tensors=None) -> Path:
    folder = Path(shutil.copytree(made.root / "packed", tmp_path / "packed"))
    if config is not None:
        _edit_json(folder / "config.json", config)
    if tensors is not None:
        _resave(folder / "model.safetensors", tensors)
    return folder


def test_good_packed_folder_and_lut_checkpoint_load(made):
    m = fresh(made)
    apply_packed(m, made.root / "packed", made.fp)
    assert set(lut_layers(m)) == {UP, "model.layers.1.mlp.up_proj"}
    m = fresh(made)
    apply_lut_checkpoint(m, made.root / "lut.safetensors", made.fp)
    assert set(lut_layers(m)) == {UP, "model.layers.1.mlp.up_proj"}


def _rename(c, new):
    c["layers"][new] = c["layers"].pop(UP)


CONFIG_CASES = {
    "empty name": (lambda c: _rename(c, ""), r"config.json: layers: '' is not a Linear layer of LlamaForCausalLM"),
    "path name": (lambda c: _rename(c, "../../etc/passwd"), r"layers: '\.\./\.\./etc/passwd' is not a Linear layer"),
    "not linear": (lambda c: _rename(c, "model.norm"), r"layers: 'model.norm' is not a Linear layer"),
    "unknown setting": (lambda c: _set(c, ("layers", UP, "spec", "colour"), 1), r"unknown LUT setting\(s\) colour"),
    "bits type": (lambda c: _set(c, ("layers", UP, "spec", "bits"), "2"), r"'bits' must be int, got '2'"),
    "bits bool": (lambda c: _set(c, ("layers", UP, "spec", "bits"), True), r"'bits' must be int, got True"),
    "form": (lambda c: _set(c, ("layers", UP, "spec", "form"), "v3"), r"form 'v3' is not one of v1, v2"),
    "group rows": (lambda c: _set(c, ("layers", UP, "spec", "group_rows"), 7), r"group_rows 7 does not divide"),
    "code bits": (lambda c: _set(c, ("layers", UP, "code_bits"), 2), r"code_bits is 2; 3-bit tables .* 3-bit codes"),
    "in features": (lambda c: _set(c, ("layers", UP, "in_features"), 31), r"in_features is 31, the model's .* 32"),
    "layer keys": (lambda c: c["layers"][UP].pop("code_bits"), r"layers: '.*up_proj' must be a mapping with keys"),
    "layers list": (lambda c: _set(c, ("layers",), [1]), r"config.json: 'layers' must be a non-empty mapping"),
    "no tokenizer": (lambda c: c.pop("tokenizer"), r"config.json: 'tokenizer' must be a non-empty string"),
    "version": (lambda c: _set(c, ("version",), "1"), r"config.json: packed format version '1'; this qatkit reads 1"),
    "huge rank": (lambda c: _set(c, ("layers", UP, "spec", "rank"), 10**9), r"model.safetensors: .*scale_a has shape"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_packed_config_refused_naming_the_field(made, tmp_path, case):
    edit, match = CONFIG_CASES[case]
    folder = packed_copy(made, tmp_path, config=edit)
    with pytest.raises(CheckpointError, match=match):
        apply_packed(fresh(made), folder, made.fp)


def _nan(name):
    return lambda t: t[name].view(-1)[:1].fill_(float("nan"))


TENSOR_CASES = {
    "nan table": (_nan(f"{UP}.lut"), rf"tensor '{UP}.lut' holds 1 NaN or inf"),
    "inf scale": (lambda t: t[f"{UP}.scale_b"].view(-1)[:1].fill_(float("inf")), rf"'{UP}.scale_b' holds 1 NaN or inf"),
    "table dtype": (
        lambda t: t.update({f"{UP}.lut": t[f"{UP}.lut"].float()}),
        r"lut has dtype torch.float32, the model",
    ),
    "codes shape": (
        lambda t: t.update({f"{UP}.codes": t[f"{UP}.codes"][:-1]}),
        r"codes has shape \(767,\), the model has \(768,\)",
    ),
    "extra tensor": (lambda t: t.update({"x": torch.zeros(1)}), r"unexpected \['x'\]"),
    "missing tensor": (lambda t: t.pop(f"{UP}.scale_a"), rf"missing \['{UP}.scale_a'\]"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_packed_tensors_refused_naming_the_tensor(made, tmp_path, case):
    edit, match = TENSOR_CASES[case]
    folder = packed_copy(made, tmp_path, tensors=edit)
    with pytest.raises(CheckpointError, match="model.safetensors: .*" + match):
        apply_packed(fresh(made), folder, made.fp)


def test_packed_file_altered_after_writing_is_refused(made, tmp_path):
    folder = packed_copy(made, tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: content hash mismatch"):
        apply_packed(fresh(made), folder, made.fp)


def _replace(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(kind.encode("latin-1"))


FILE_CASES = {
    "malformed": ("{not json", r"malformed JSON \(Expecting property name"),
    "not utf-8": ("\xff\xfe{}", r"not UTF-8 text \(byte 0"),
    "deep": ("[" * 100_000 + "]" * 100_000, r"JSON nested too deeply"),
    "list": ("[1, 2]", r"expected .* \(a JSON object\), got a JSON list"),
    "dir": ("dir", r"not a regular file"),
    "fifo": ("fifo", r"not a regular file"),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_packed_config_file_refused_in_one_line(made, tmp_path, case):
    if case == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    kind, match = FILE_CASES[case]
    folder = packed_copy(made, tmp_path)
    _replace(folder / "config.json", kind)
    with pytest.raises(CheckpointError, match="config.json: " + match):
        apply_packed(fresh(made), folder, made.fp)
    from qatkit.cli.lm import load_for_inference  # generate and lm-export: same error, never blocked on a FIFO

    with pytest.raises(CheckpointError, match="config.json: " + match):
        load_for_inference(str(folder), None)


def test_cli_prints_one_line_naming_the_file(made, tmp_path, monkeypatch, capsys):
    from qatkit.cli.main import main

    folder = packed_copy(made, tmp_path, config=lambda c: _rename(c, "../../etc/passwd"))
    monkeypatch.setattr(sys, "argv", ["qatkit", "generate", str(folder), "--prompt", "the"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err  # above the error line: the base model's loading progress bar
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err
    assert f"{folder / 'config.json'}: layers: '../../etc/passwd' is not a Linear layer" in errors[0]


# ---- LUT training checkpoints ---------------------------------------------------------------------------------
def lut_copy(made, tmp_path, tensors=lambda t: None, meta=None) -> Path:
    path = Path(shutil.copy(made.root / "lut.safetensors", tmp_path / "lut.safetensors"))
    _resave(path, tensors, meta)
    return path


def _scale(t, v):
    t[f"{UP}.scale_a"].fill_(v)
    t[f"{UP}.scale_b"].fill_(v)


LUT_CASES = {
    "index range": (lambda t: t[f"{UP}.index"].fill_(200), None, rf"'{UP}.index' holds index 200, .* only 8 entries"),
    "index dtype": (lambda t: t.update({f"{UP}.index": t[f"{UP}.index"].long()}), None, r"index has dtype torch.int64"),
    "nan weight": (_nan(f"{UP}.weight"), None, rf"tensor '{UP}.weight' holds 1 NaN or inf"),
    "no latent": (lambda t: t.update({f"{UP}.weight": torch.zeros(0)}), None, rf"{UP}.weight has shape \(0,\)"),
    "overflow": (lambda t: _scale(t, 1e30), None, rf"layer '{UP}': table values times scales overflow"),
    "empty name": (lambda t: None, lambda m: _rename({"layers": m["layers"]}, ""), r"layers: '' is not a Linear"),
    "settings": (lambda t: None, lambda m: _set(m, ("layers", UP, "rank"), 3), rf"{UP}.scale_a has shape \(64, 2\)"),
    "no base": (lambda t: None, lambda m: m.pop("base"), r"'base' must be a non-empty string, got None"),
    "layers": (lambda t: None, lambda m: _set(m, ("layers",), "all"), r"'layers' must be a non-empty mapping"),
}


@pytest.mark.parametrize("case", LUT_CASES)
def test_lut_checkpoint_refused_naming_the_problem(made, tmp_path, case):
    tensors, meta, match = LUT_CASES[case]
    path = lut_copy(made, tmp_path, tensors, meta)
    model = fresh(made)
    with pytest.raises(CheckpointError, match="lut.safetensors: .*" + match):
        apply_lut_checkpoint(model, path, made.fp)
    assert not lut_layers(model)  # refused before any layer was replaced


def test_lut_checkpoint_altered_after_writing_is_refused_before_the_model_changes(made, tmp_path):
    """The file is read one tensor at a time; a flipped bit anywhere is found before any layer is replaced."""
    path = lut_copy(made, tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    model = fresh(made)
    with pytest.raises(CheckpointError, match="lut.safetensors: content hash mismatch"):
        apply_lut_checkpoint(model, path, made.fp)
    assert not lut_layers(model)


def test_lut_checkpoint_replaced_after_it_was_checked_is_refused(made, tmp_path):
    """Tensors are read again layer by layer: one that differs from what was checked is refused."""
    from qatkit.io.checkpoint import VerifiedWeights

    path = lut_copy(made, tmp_path)
    with VerifiedWeights(path) as f:
        _resave(path, lambda t: t[f"{UP}.lut"].mul_(2))  # a valid file again, with other values
        assert f.read([f"{UP}.index"])  # unchanged tensors still read
        with pytest.raises(CheckpointError, match=rf"tensor '{UP}.lut' changed after the file was checked"):
            f.read([f"{UP}.lut"])


def test_lut_spec_from_dict_refuses_unknown_keys_and_wrong_types():
    assert LUTSpec.from_dict(LUTSpec(bits=3).to_dict()) == LUTSpec(bits=3)
    with pytest.raises(ValueError, match=r"'group_rows' must be int or null, got '1'"):
        LUTSpec.from_dict({"group_rows": "1"})
    with pytest.raises(ValueError, match=r"'ste_fp16' must be bool, got 1"):
        LUTSpec.from_dict({"ste_fp16": 1})
    with pytest.raises(ValueError, match="group_rows must be >= 1"):
        LUTSpec(group_rows=-1)
    with pytest.raises(ValueError, match="must be a mapping, got list"):
        LUTSpec.from_dict([2])


# ---- KD caches ----------------------------------------------------------------------------------------------
def cache_copy(made, tmp_path) -> Path:
    return Path(shutil.copytree(made.root / "kd", tmp_path / "kd"))


def test_good_cache_opens_and_checks_the_student_vocabulary(made):
    ds = KDCache(made.root / "kd", made.tok, "all", fresh(made))
    assert len(ds) == 6 and ds[5]["topk_ids"].shape == (L - 1, K)
    student = fresh(made)
    student.resize_token_embeddings(made.vocab + 8)  # padded to another size: its logits are not the cache's
    with pytest.raises(CacheError, match=rf"over {made.vocab} token ids, but the model has {made.vocab + 8} output"):
        KDCache(made.root / "kd", made.tok, "train", student)


VALUE_CASES = {
    "input_ids": (1 << 30, "token id outside the vocabulary"),
    "topk_ids": (-1, "token id outside the vocabulary"),
    "neg_ids": (1 << 30, "token id outside the vocabulary"),
    "topk_logits": (np.nan, "non-finite teacher logit nan"),
    "neg_logits": (-np.inf, "non-finite teacher logit -inf"),
}


@pytest.mark.parametrize("field", VALUE_CASES)
def test_cache_values_refused_naming_shard_and_position(made, tmp_path, field):
    value, match = VALUE_CASES[field]
    folder = cache_copy(made, tmp_path)
    path = folder / f"shard_00001.{field}.npy"
    arr = np.load(path)
    arr[1, 2, ...] = value
    np.save(path, arr)
    with pytest.raises(CacheError, match=rf"shard_00001.{field}.npy: {match}.* at index \(1, 2"):
        KDCache(folder, split="all")


def _no_eval_key(m):
    m.pop("eval_sequences")


MANIFEST_CASES = {
    "shards ints": (lambda m: _set(m, ("shards",), [0, 1]), r"'shards' must be a list of shard names"),
    "shards other": (lambda m: m["shards"].append("../x"), r"'shards' should be shard_00000 to shard_00001"),
    "tokenizer": (lambda m: _set(m, ("tokenizer",), 5), r"'tokenizer' must be a string, got 5"),
    "negatives": (lambda m: _set(m, ("negatives",), -1), r"'negatives' must be >= 0, got -1"),
    "vocab type": (lambda m: _set(m, ("vocab_size",), "150"), r"'vocab_size' must be an integer, got '150'"),
    "vocab small": (lambda m: _set(m, ("vocab_size",), 4), r"top_k \+ negatives = 5 exceeds vocab_size 4"),
    "count": (lambda m: _set(m, ("num_sequences",), 0), r"'num_sequences' must be >= 1, got 0"),
    "bool": (lambda m: _set(m, ("top_k",), True), r"'top_k' must be an integer, got True"),
    "eval range": (lambda m: _set(m, ("eval_sequences",), [99]), r"'eval_sequences' must be .* in \[0, 6\)"),
    "eval type": (lambda m: _set(m, ("eval_sequences",), "0"), r"'eval_sequences' must be a list"),
    "fraction": (lambda m: _set(m, ("eval_fraction",), None), r"'eval_fraction' must be a number in \[0, 1\)"),
    "dtype": (lambda m: _set(m, ("dtype",), "float32"), r"'dtype' must be 'float16'"),
    "missing": (_no_eval_key, r"missing keys eval_sequences"),
    "version": (lambda m: _set(m, ("version",), True), r"has KD cache version True"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_cache_manifest_values_refused(made, tmp_path, case):
    edit, match = MANIFEST_CASES[case]
    folder = cache_copy(made, tmp_path)
    _edit_json(folder / "manifest.json", edit)
    with pytest.raises(CacheError, match="manifest.json.*" + match):
        KDCache(folder)


@pytest.mark.parametrize("case", FILE_CASES)
def test_cache_manifest_file_refused_in_one_line(made, tmp_path, case):
    kind, match = FILE_CASES[case]
    folder = cache_copy(made, tmp_path)
    _replace(folder / "manifest.json", kind)
    with pytest.raises(CacheError, match="manifest.json: " + match):
        KDCache(folder)


SHARD_FILE_CASES = {
    "fifo": ("fifo", r"is not a regular file"),
    "dir": ("dir", r"is not a regular file"),
    "empty": ("", r"is unreadable"),
    "not npy": ("hello", r"is unreadable"),
}


@pytest.mark.parametrize("case", SHARD_FILE_CASES)
def test_cache_shard_file_refused(made, tmp_path, case):
    kind, match = SHARD_FILE_CASES[case]
    folder = cache_copy(made, tmp_path)
    _replace(folder / "shard_00000.topk_logits.npy", kind)
    with pytest.raises(CacheError, match="shard_00000.topk_logits.npy " + match):
        KDCache(folder)


def test_cache_shard_with_pickled_objects_is_refused(made, tmp_path):
    folder = cache_copy(made, tmp_path)
    np.save(folder / "shard_00000.neg_ids.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CacheError, match="shard_00000.neg_ids.npy is unreadable: .*Python objects"):
        KDCache(folder)


# ---- corpus files and quantization configs -----------------------------------------------------------------
def test_corpus_files_refused_naming_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n\xff\n')
    with pytest.raises(ValueError, match=r"bad.jsonl is not UTF-8 text \(byte 15"):
        read_texts([bad])
    bad.write_text('{"text": "ok"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON \(RecursionError\)"):
        read_texts([bad])
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match="pipe is not a regular file or folder"):
        read_texts([tmp_path / "pipe"])


@pytest.mark.parametrize(
    "content, match",
    [(b"\xff", r"not UTF-8 text"), (b"rules: [", r"not valid YAML"), (b"[" * 100_000, r"not valid YAML|nested deeper")],
)
def test_quant_config_file_refused_naming_the_file(tmp_path, content, match):
    from qatkit.cli.lm import load_quant_config

    path = tmp_path / "q.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match="q.yaml: " + match):
        load_quant_config(path, {})
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(RecipeError, match="q.yaml: not a regular file"):
        load_quant_config(path, {})
