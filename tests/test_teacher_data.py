"""Teacher-generated distillation text (resumable, seeded), mixing it with file corpora, per-source evaluation,
the KD health verdict and the teacher/student answers in lm-train's report, on a tiny Llama."""

import json

import pytest
import torch

from qatkit.lm import teacher_data as td
from qatkit.lm.cache import KDCache, build_kd_cache
from qatkit.lm.corpus import tokenize_corpus
from qatkit.lm.hf import load_causal_lm
from qatkit.lm.kd_task import KDTask
from qatkit.lm.quality import health
from qatkit.train.helpers import make_loader
from tiny_lm import SAMPLE_TEXT

pytest.importorskip("transformers")


class Counting:
    """The teacher with its ``generate`` calls counted (and made to fail after ``fail_after`` calls)."""

    def __init__(self, model, fail_after=None):
        self.model, self.calls, self.fail_after = model, 0, fail_after

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, *args, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.model.generate(*args, **kwargs)


def test_generation_resumes_after_the_last_finished_block_with_the_same_documents(tiny_lm_dir, tmp_path):
    model, tok = load_causal_lm(tiny_lm_dir)
    cfg = td.GenerationConfig(documents=7, max_new_tokens=6, block=2, prompts=["the river", "the baker"])
    full = td.generate_documents(model, tok, cfg, tmp_path / "a", teacher_name="tiny", log=lambda *_: None)
    assert len(full) == 7 and full[0].startswith("the river") and full[2].startswith("the baker")
    assert len({d for d in full}) > 1  # sampled, not one document repeated
    cut = Counting(model, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        td.generate_documents(cut, tok, cfg, tmp_path / "b", teacher_name="tiny", log=lambda *_: None)
    assert len((tmp_path / "b" / td.GENERATED).read_text().splitlines()) == 4  # two finished blocks on disk
    again = Counting(model)
    resumed = td.generate_documents(again, tok, cfg, tmp_path / "b", teacher_name="tiny", log=lambda *_: None)
    assert again.calls == 2  # only the two unfinished blocks were generated: no silent restart
    assert resumed == full
    other = td.GenerationConfig(documents=7, max_new_tokens=6, block=2, prompts=["the river"], temperature=0.5)
    with pytest.raises(ValueError, match="other settings .*temperature.*prompts"):
        td.generate_documents(model, tok, other, tmp_path / "b", teacher_name="tiny", log=lambda *_: None)


def test_chat_generation_stores_conversations_and_needs_prompts(tiny_lm_dir, tmp_path):
    model, tok = load_causal_lm(tiny_lm_dir)
    with pytest.raises(ValueError, match="needs prompts"):
        td.GenerationConfig(documents=2, chat=True)
    cfg = td.GenerationConfig(documents=2, max_new_tokens=4, block=2, chat=True, prompts=["the river"])
    docs = td.generate_documents(model, tok, cfg, tmp_path, teacher_name="tiny", log=lambda *_: None)
    assert [m["role"] for m in docs[0]] == ["user", "assistant"] and docs[0][0]["content"] == "the river"
    assert tokenize_corpus(docs, tok, 4).shape[1] == 4  # conversations go through the chat template


@pytest.mark.parametrize(("n_gen", "n_cor", "share"), [(30, 10, 0.5), (10, 30, 0.5), (40, 10, 0.25), (5, 50, 0.8)])
def test_mixing_keeps_the_share_and_every_window_of_the_scarcer_side(n_gen, n_cor, share):
    gen, cor = torch.arange(n_gen)[:, None].repeat(1, 3), 1000 + torch.arange(n_cor)[:, None].repeat(1, 3)
    seqs, counts = td.mix_windows(gen, cor, share)
    g, c = counts["generated"], counts["corpus"]
    assert torch.equal(seqs[:g], gen[:g]) and torch.equal(seqs[g:], cor[:c]) and len(seqs) == g + c
    assert g == n_gen or c == n_cor  # the scarcer side is used whole
    assert abs(g / (g + c) - share) <= 1 / (g + c)  # the share, to one window
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        td.mix_windows(gen, cor, 1.0)


def test_a_cache_evaluates_each_source_on_its_own_rows(tiny_lm_dir, tmp_path):
    model, tok = load_causal_lm(tiny_lm_dir)
    cor = tokenize_corpus([SAMPLE_TEXT], tok, 16)
    gen = torch.randint(4, len(tok), (6, 16), generator=torch.Generator().manual_seed(0))
    seqs, sources = td.mix_windows(gen, cor, 0.5)
    build_kd_cache(model, tok, seqs, tmp_path, teacher_name="tiny", top_k=4, negatives=4, eval_fraction=0.5,
                   sources=sources, log=lambda *_: None)  # fmt: skip
    for name, rows in (("generated", gen), ("corpus", cor)):
        ds = KDCache(tmp_path, tok, "all", source=name)
        assert len(ds) == sources[name]
        assert all(torch.equal(ds[i]["input_ids"], rows[i]) for i in range(len(ds)))
    held = KDCache(tmp_path, tok, "eval")
    assert len(KDCache(tmp_path, tok, "eval", source="generated")) + len(
        KDCache(tmp_path, tok, "eval", source="corpus")
    ) == len(held)
    with pytest.raises(ValueError, match="no source 'web'"):
        KDCache(tmp_path, tok, "eval", source="web")


def test_the_teacher_itself_scores_full_agreement_and_zero_kl(tiny_lm_dir, kd_cache_dir):
    model, tok = load_causal_lm(tiny_lm_dir)  # the student is the teacher: the reference for both measures
    m = KDTask().evaluate(model, make_loader(KDCache(kd_cache_dir, tok, "eval"), 4, False), "cpu")
    assert m["top1_agreement"] == 1.0 and m["kl_t1"] == pytest.approx(0.0, abs=1e-3)
    assert health(m)["verdict"] == "healthy"
    assert health({"kl_t1": 0.31, "top1_agreement": 0.99})["verdict"] == "degraded"
    assert health({"kl_t1": 0.1, "top1_agreement": 0.85})["failed"][0].startswith("teacher top-1 agreement 85.0%")


def test_kd_cache_generate_then_lm_train_reports_quality_by_source_and_answers(tiny_lm_dir, tmp_path):
    from typer.testing import CliRunner

    from qatkit.cli.main import app

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 2)
    (tmp_path / "q.txt").write_text("the river\nthe baker\n")
    cache = tmp_path / "cache"
    args = ["kd-cache", "--teacher", str(tiny_lm_dir), "--corpus", str(corpus), "--out", str(cache), "--seq-len",
            "16", "--top-k", "4", "--negatives", "4", "--eval-fraction", "0.3", "--generate", "8", "--gen-tokens", "20",
            "--generated-share", "0.5", "--check-prompts", str(tmp_path / "q.txt")]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    manifest = json.loads((cache / "manifest.json").read_text())
    counts = dict(manifest["sources"])
    assert set(counts) == {"generated", "corpus"} and abs(counts["generated"] - counts["corpus"]) <= 1
    assert json.loads((cache / td.ANSWERS).read_text())["prompts"] == ["the river", "the baker"]
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["lm-train", "--cache-dir", str(cache), "--output-dir", str(run), "--model",
                                 str(tiny_lm_dir), "--from-scratch", "--preset", "Q4_A4", "--max-steps", "2",
                                 "--batch-size", "2", "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["eval_by_source"]) == {"generated", "corpus"}
    for m in summary["eval_by_source"].values():
        assert 0 <= m["top1_agreement"] <= 1 and m["kl_t1"] >= 0 and m["perplexity"] > 1
    assert summary["health"]["source"] == "generated" and summary["health"]["verdict"] in ("healthy", "degraded")
    assert [a["prompt"] for a in summary["answers"]] == ["the river", "the baker"]
    report = (run / "report.md").read_text()
    assert "| teacher top-1 agreement |" in report and "## Greedy answers, teacher and student" in report
    assert "| the river |" in report and "peak resident set" in report
    assert summary["peak_rss_bytes"] > summary["memory_estimate"]["model"] > 0
