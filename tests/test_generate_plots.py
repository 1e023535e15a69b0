"""Loss plots from training CSVs, and text generation with a tiny offline Llama (greedy, seeded sampling, loop)."""

import csv
import math

import pytest
import torch

from qatkit.train.plots import _find_csvs, plot_loss

PNG_MAGIC = b"\x89PNG"


def _write_csv(path, fields, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _logger_rows(n=6):
    """Rows shaped like qatkit.train.logger.RunLogger's <stage>_train.csv (one per epoch, val_loss sometimes empty)."""
    return [
        dict(epoch=e, step=50 * (e + 1), lr=1e-3, train_loss=2.0 / (e + 1), grad_norm_mean=1.0, grad_norm_max=2.0,
             skipped_steps=0, val_accuracy=0.5, val_loss="" if e == 2 else 2.2 / (e + 1), val_macro_f1=0.4, seconds=1.0)
        for e in range(n)
    ]  # fmt: skip


def _simple_rows(n=120):
    """Rows of a step,train_loss,eval_loss,lr,elapsed_sec log: train loss every step, eval loss every 20 steps."""
    return [
        dict(step=s, train_loss=5.0 * math.exp(-s / 30) + 0.1, eval_loss=5.0 * math.exp(-s / 30) + 0.2 if s % 20 == 0
             else "", lr=1e-4, elapsed_sec=0.1 * s)
        for s in range(n)
    ]  # fmt: skip


def _check_png(path, size=(500, 800)):
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == size


def test_plot_loss_logger_and_simple_formats(tmp_path):
    run = tmp_path / "my_run"
    _write_csv(run / "float_train.csv", list(_logger_rows()[0]), _logger_rows())
    _write_csv(run / "qat_train.csv", list(_logger_rows()[0]), _logger_rows(3))
    _write_csv(run / "logs" / "training_log.csv", list(_simple_rows()[0]), _simple_rows())
    _write_csv(run / "logs" / "lm_train.csv", ["step", "loss", "lr", "grad_norm"],
               [dict(step=s, loss=3.0 - 0.01 * s, lr=1e-3, grad_norm=1.0) for s in range(30)])  # fmt: skip
    _write_csv(run / "float_steps.csv", ["step", "loss", "lr", "grad_norm", "seconds"],
               [dict(step=s, loss=2.5 / (1 + s / 50), lr=1e-3, grad_norm="", seconds=0.01 * s) for s in range(1, 301)])  # fmt: skip
    _write_csv(run / "orphan_steps.csv", ["step", "loss"], [dict(step=1, loss=1.0), dict(step=2, loss="nan")])
    (run / "interventions.csv").write_text("stage,step\n")
    groups = {label: [p.name for p in paths] for label, paths in _find_csvs(run)}
    assert groups == {"float_train": ["float_steps.csv", "float_train.csv"], "qat_train": ["qat_train.csv"],
                      "orphan_steps": ["orphan_steps.csv"], "lm_train": ["lm_train.csv"],
                      "training_log": ["training_log.csv"]}  # fmt: skip
    out = plot_loss(run)
    assert out == run / "loss.png"
    _check_png(out)


def test_plot_loss_custom_out_and_single_csv(tmp_path):
    _write_csv(tmp_path / "training_log.csv", list(_simple_rows()[0]), _simple_rows(15))
    out = plot_loss(tmp_path, tmp_path / "figs" / "curve.png")
    assert out == tmp_path / "figs" / "curve.png"
    _check_png(out)


def test_plot_loss_errors(tmp_path):
    with pytest.raises(ValueError, match="no training CSV"):
        plot_loss(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        plot_loss(tmp_path / "missing")
    _write_csv(tmp_path / "x_train.csv", ["step", "accuracy"], [dict(step=1, accuracy=0.5)])
    with pytest.raises(ValueError, match="looked for columns loss, train_loss, eval_loss, val_loss"):
        plot_loss(tmp_path)


# --- generation -------------------------------------------------------------------------------------------------


SENTENCES = [
    "the cat sat on the mat",
    "the dog ran in the park",
    "a bird sang a song in the tree",
    "quantized models run fast on small chips",
]


@pytest.fixture(scope="module")
def tiny_lm():
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")  # fmt: skip
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), initializer_range=0.2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def _manual_greedy(model, tok, ids, n):
    ids = torch.tensor([ids])
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new


def test_greedy_matches_manual_loop(tiny_lm):
    from qatkit.lm.generate import generate_text

    model, tok = tiny_lm
    prompt = "the cat sat"
    new = _manual_greedy(model, tok, tok(prompt)["input_ids"], 12)
    text = generate_text(model, tok, prompt, max_tokens=12, temperature=0, repetition_penalty=1.0)
    assert text == tok.decode(new, skip_special_tokens=True)
    assert tok(text)["input_ids"] == [t for t in new if t != tok.eos_token_id]


def test_sampling_reproducible_and_stream(tiny_lm):
    from qatkit.lm.generate import generate_text

    model, tok = tiny_lm
    a = generate_text(model, tok, "the dog", max_tokens=16, temperature=1.0, seed=3)
    b = generate_text(model, tok, "the dog", max_tokens=16, temperature=1.0, seed=3)
    assert a == b and a
    pieces = []
    c = generate_text(model, tok, "the dog", max_tokens=16, temperature=1.0, seed=3, stream=pieces.append)
    assert c == a and "".join(pieces) == a and len(pieces) > 1


def test_chat_template(tiny_lm):
    from qatkit.lm.generate import generate_text

    model, tok = tiny_lm
    with pytest.raises(ValueError, match="chat_template"):
        generate_text(model, tok, "the cat", chat=True)
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} song{% endfor %}"
    try:
        with_template = generate_text(model, tok, "the cat", max_tokens=8, temperature=0)
        rendered = generate_text(model, tok, "<s> the cat song", max_tokens=8, temperature=0, chat=False)
        plain = _manual_greedy(model, tok, tok("the cat")["input_ids"], 8)
    finally:
        tok.chat_template = None
    assert with_template == rendered
    assert with_template != tok.decode(plain, skip_special_tokens=True)


def test_generate_validation(tiny_lm):
    from qatkit.lm.generate import generate_text

    model, tok = tiny_lm
    for kwargs, msg in [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                        ({"repetition_penalty": 0}, "repetition_penalty")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            generate_text(model, tok, "the", **kwargs)


def _reader(lines):
    it = iter(lines)

    def read(prompt=""):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_interactive_stops_on_eof_and_exit(tiny_lm):
    from qatkit.lm.generate import generate_text, interactive

    model, tok = tiny_lm
    out = []
    interactive(model, tok, read=_reader(["the cat", "a bird"]), write=out.append, max_tokens=4, temperature=0)
    assert out == [generate_text(model, tok, p, max_tokens=4, temperature=0) for p in ["the cat", "a bird"]]
    out.clear()
    interactive(model, tok, read=_reader(["the dog", "exit", "the cat"]), write=out.append, max_tokens=4)
    assert len(out) == 1
    out.clear()
    interactive(model, tok, read=_reader(["", "the cat"]), write=out.append, max_tokens=4)
    assert out == []
