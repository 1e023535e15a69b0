"""Causal-LM LUT workflow on tiny Llama / Qwen3 models: rules, packing round trip, resume, and the CLI chain
kd-cache -> lm-train -> lm-convert -> snap -> generate -> plot-loss, as a user runs it."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from qatkit.base.config import RecipeError
from qatkit.io.checkpoint import CheckpointError
from qatkit.lm.checkpoint import load_lut_model
from qatkit.lm.hf import load_causal_lm
from qatkit.lm.pack import load_packed, save_packed, snap_model
from qatkit.lm.rules import LMQuantConfig, LUTRule, bits_per_weight, dequantized, lut_layers, prepare_lm
from qatkit.lm.train import lm_train
from qatkit.nn.lut_linear import LUTLinear
from qatkit.train.config import TrainConfig
from tiny_lm import SAMPLE_TEXT

pytest.importorskip("transformers")


def qatkit(*args):
    r = subprocess.run([sys.executable, "-m", "qatkit", *map(str, args)], capture_output=True, text=True, timeout=300)
    return r


def cli(*args):
    """The command run in this process (the chain is about what each command does; the entry point and its
    one-line errors are tested through real subprocesses in test_cli_errors_are_one_line)."""
    from typer.testing import CliRunner

    from qatkit.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_q2_a4_preset_takes_mlp_and_attention_and_leaves_embeddings_float(arch, tiny_lm_dir, tiny_qwen3_dir):
    model, _ = load_causal_lm(tiny_lm_dir if arch == "llama" else tiny_qwen3_dir)
    report = prepare_lm(model, LMQuantConfig(preset="Q2_A4"))
    layers = lut_layers(model)
    assert len(layers) == 2 * 7
    assert {m.spec.bits for n, m in layers.items() if ".mlp." in n} == {2}
    assert {m.spec.rank for n, m in layers.items() if ".self_attn." in n} == {8}
    assert report.float_linear == ["lm_head"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in n or ".self_attn." in n for n in trainable)
    bits = bits_per_weight(model)
    assert 2 < bits["index_bits"] < 4 and bits["overhead_bits"] > 0


def test_mlp_only_and_dead_rules_and_g_only(tiny_lm_dir):
    model, _ = load_causal_lm(tiny_lm_dir)
    prepare_lm(model, LMQuantConfig(preset="Q2_A4", mlp_only=True, form="v2", g_only=True))
    assert all(".mlp." in n for n in lut_layers(model))
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad} == {"magnitude"}
    model, _ = load_causal_lm(tiny_lm_dir)
    with pytest.raises(RecipeError, match="'fc' .* matches no Linear layer"):
        prepare_lm(model, LMQuantConfig(preset=None, rules=[LUTRule(name="fc", match=["*.fc1"])]))
    with pytest.raises(ValueError, match="g_only .* needs form: v2"):
        LMQuantConfig(g_only=True)


def test_packed_round_trip_is_exact_and_smaller(tiny_lm_dir, tmp_path):
    model, tok = load_causal_lm(tiny_lm_dir)
    prepare_lm(model, LMQuantConfig(preset="Q2_A4"))
    with torch.no_grad():  # make tables and scales non-trivial, as after training
        for m in lut_layers(model).values():
            m.lut.mul_(1.0 + 0.01 * torch.randn_like(m.lut))
    snap_model(model)
    report = save_packed(tmp_path / "packed", model, base=str(tiny_lm_dir), tokenizer=tok)
    loaded, _ = load_packed(tmp_path / "packed")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for (n, a), (_, b) in zip(lut_layers(model).items(), lut_layers(loaded).items(), strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.lut, b.lut), n
        assert torch.equal(a.lut, a.lut.half().float())  # snapped to FP16 values
    counted = report["bits_per_weight"] * report["weights"] / 8  # indices + tables + scales, by count
    assert counted <= report["file_bytes"] <= counted + 16 * 1024  # the file is that plus its header
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["format"] == "qatkit-packed-lut" and len(config["layers"]) == 14


def test_dequantized_block_gives_the_same_logits_and_puts_the_lut_layers_back(tiny_lm_dir):
    model, _ = load_causal_lm(tiny_lm_dir)
    prepare_lm(model, LMQuantConfig())
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with dequantized(model):
            assert not lut_layers(model)
            got = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5) and len(lut_layers(model)) == 14


def test_lut_checkpoint_refuses_another_tokenizer_and_foreign_files(tiny_lm_dir, tmp_path):
    from qatkit.io.checkpoint import save_weights
    from qatkit.lm.checkpoint import apply_lut_checkpoint, save_lut_model

    model, _ = load_causal_lm(tiny_lm_dir)
    prepare_lm(model, LMQuantConfig(preset="Q4_A4"))
    save_lut_model(tmp_path / "m.safetensors", model, base=str(tiny_lm_dir), tokenizer_fp="abc")
    fresh, _ = load_causal_lm(tiny_lm_dir)
    with pytest.raises(CheckpointError, match="another tokenizer"):
        apply_lut_checkpoint(fresh, tmp_path / "m.safetensors", tokenizer_fp="xyz")
    save_weights(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"kind": "training-state"})
    with pytest.raises(CheckpointError, match="not a LUT model checkpoint"):
        apply_lut_checkpoint(fresh, tmp_path / "other.safetensors")
    apply_lut_checkpoint(fresh, tmp_path / "m.safetensors", tokenizer_fp="abc")
    assert all(isinstance(m, LUTLinear) for m in lut_layers(fresh).values())


def test_v2_checkpoint_holds_no_latent_weights_and_reloads_to_the_same_logits(tiny_lm_dir, tmp_path):
    from safetensors import safe_open

    from qatkit.lm.checkpoint import apply_lut_checkpoint, save_lut_model
    from qatkit.lm.convert import v1_to_v2

    model, _ = load_causal_lm(tiny_lm_dir)
    prepare_lm(model, LMQuantConfig(preset="Q2_A4"))
    v1 = tmp_path / "v1.safetensors"
    save_lut_model(v1, model, base=str(tiny_lm_dir), tokenizer_fp="abc")
    v1_to_v2(model)
    assert not any(m.has_latent for m in lut_layers(model).values())
    v2 = tmp_path / "v2.safetensors"
    save_lut_model(v2, model, base=str(tiny_lm_dir), tokenizer_fp="abc")
    with safe_open(str(v2), "pt") as f:
        assert all(f.get_slice(k).get_shape() == [0] for k in f.keys() if k.endswith(".weight"))
    latent_bytes = 4 * sum(m.num_weights for m in lut_layers(model).values())
    saved = v1.stat().st_size - v2.stat().st_size  # the V1 file's FP32 latent weights (V2's magnitudes and longer
    assert abs(saved - latent_bytes) <= 4096  # header take back a little)
    ids = torch.arange(3, 19).reshape(2, 8)
    for path in (v2, v1):  # a V1 file reloads with latent weights; converted, it computes what the V2 file does
        fresh, _ = load_causal_lm(tiny_lm_dir)
        apply_lut_checkpoint(fresh, path, tokenizer_fp="abc")
        assert all(m.has_latent == (path == v1) for m in lut_layers(fresh).values())
        if path == v1:
            v1_to_v2(fresh)
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.usefixtures("one_thread")
def test_lm_train_resumed_from_a_step_checkpoint_equals_the_uninterrupted_run(tiny_lm_dir, kd_cache_dir, tmp_path):
    cfg = TrainConfig(epochs=100, max_steps=6, lr=3e-3, schedule="constant", weight_decay=0.0,
                      checkpoint={"every_steps": 2}, logging={"tensorboard": False, "step_csv": True})  # fmt: skip
    common = {"cache": kd_cache_dir, "train": cfg, "batch_size": 2, "base": str(tiny_lm_dir), "progress": False,
              "log": lambda *_: None}  # fmt: skip
    full = lm_train(out=tmp_path / "a", **common)
    assert full["steps"] == 6
    lm_train(out=tmp_path / "b", **common)
    step4 = tmp_path / "b" / "checkpoints" / "lm" / "step-00000004.safetensors"
    with safe_open(step4, "pt") as f:  # lm-train keeps the frozen embeddings out of its training states
        keys = set(f.keys())
    assert "model/model.embed_tokens.weight" not in keys and any(k.endswith("scale_a") for k in keys)
    resumed = lm_train(out=tmp_path / "b", resume=str(step4), **common)
    assert resumed["steps"] == 6
    a, _, _ = load_lut_model(tmp_path / "a" / "model.safetensors")
    b, _, _ = load_lut_model(tmp_path / "b" / "model.safetensors")
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), n


@pytest.mark.usefixtures("one_thread")
def test_activation_checkpointing_trains_the_same_weights(tiny_lm_dir, kd_cache_dir, tmp_path):
    """Recomputing each decoder layer in the backward pass changes memory, not the gradients."""
    cfg = TrainConfig(epochs=100, max_steps=3, lr=3e-3, logging={"tensorboard": False})
    runs = {}
    for ckpt in (False, True):
        summary = lm_train(
            cache=kd_cache_dir,
            out=tmp_path / str(ckpt),
            train=cfg,
            batch_size=2,
            base=str(tiny_lm_dir),
            activation_checkpointing=ckpt,
            progress=False,
            log=lambda *_: None,
        )
        assert summary["activation_checkpointing"] is ckpt
        runs[ckpt] = load_lut_model(tmp_path / str(ckpt) / "model.safetensors")[0].state_dict()
    for k, v in runs[False].items():
        assert torch.allclose(v.float(), runs[True][k].float(), atol=1e-5), k


def test_cli_chain_kd_cache_train_convert_snap_generate_plot(tiny_lm_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 3)
    cache, run = tmp_path / "cache", tmp_path / "run"
    r = cli("kd-cache", "--teacher", tiny_lm_dir, "--corpus", corpus, "--out", cache, "--seq-len", 24,
               "--top-k", 6, "--negatives", 6, "--eval-fraction", 0.2)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((cache / "manifest.json").read_text())["top_k"] == 6
    r = cli("lm-train", "--cache-dir", cache, "--output-dir", run / "q4", "--model", tiny_lm_dir, "--from-scratch",
               "--preset", "Q4_A4", "--max-steps", 4, "--lr", 3e-3, "--batch-size", 2, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "bits per weight" in r.output
    r = cli("lm-convert", run / "q4" / "model.safetensors", "--to", "Q2_A4", "--out", run / "q2.safetensors",
               "--cache-dir", cache)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "eval KD loss" in r.output and "4-bit r4 -> 2-bit r32" in r.output
    r = cli("lm-train", "--cache-dir", cache, "--output-dir", run / "v2", "--v1-checkpoint", run / "q2.safetensors",
               "--max-steps", 3, "--batch-size", 2, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((run / "v2" / "summary.json").read_text())
    v = summary["v1_to_v2"]
    assert abs(v["kd_loss_before"] - v["kd_loss_after"]) < 1e-4  # V1 -> V2 keeps the function
    r = cli("snap", run / "v2" / "model.safetensors", "--out", run / "packed", "--cache-dir", cache)
    assert r.exit_code == 0, r.output
    assert "bits per weight" in r.output
    r = cli("generate", run / "packed", "--prompt", "the license", "--max-tokens", 5, "--temperature", 0)
    assert r.exit_code == 0, r.output
    assert r.output.strip()
    if importlib.util.find_spec("coremltools") is not None:  # the coreml extra (installed in CI)
        r = cli("lm-export", run / "packed", "--out", run / "lm.mlpackage", "--seq-len", 8)
        assert r.exit_code == 0, r.output
        assert "14 palettized weights, tables equal to the trained ones" in " ".join(r.output.split())
    r = cli("plot-loss", run / "v2")
    assert r.exit_code == 0, r.output
    assert (run / "v2" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_one_line(tiny_lm_dir, tmp_path):
    r = qatkit("lm-train", "--cache-dir", tmp_path / "missing", "--from-scratch", "--model", tiny_lm_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = qatkit("lm-train", "--cache-dir", tmp_path, "--model", tiny_lm_dir)
    assert r.returncode == 2 and "exactly one of --from-scratch" in r.stderr
    r = qatkit("generate", tiny_lm_dir)
    assert r.returncode == 2 and "--prompt" in r.stderr


def test_quant_config_yaml_sets_bits_and_rank_per_rule_and_names_bad_keys(tiny_lm_dir, tmp_path):
    from qatkit.cli.lm import load_quant_config

    good = tmp_path / "q.yaml"
    good.write_text("rules:\n  - {name: up, match: ['*.mlp.up_proj'], bits: 3, rank: 2}\n")
    cfg = load_quant_config(good, {"preset": "Q2_A4"})
    model, _ = load_causal_lm(tiny_lm_dir)
    prepare_lm(model, cfg)
    assert {(m.spec.bits, m.spec.rank) for n, m in lut_layers(model).items()} == {(3, 2)}
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {name: up, match: ['*.mlp.up_proj'], colour: red}\n")
    r = qatkit("lm-train", "--cache-dir", tmp_path, "--from-scratch", "--model", tiny_lm_dir, "--quant-config", bad)
    assert r.returncode == 2 and "unknown key 'colour'" in r.stderr and "Traceback" not in r.stderr
