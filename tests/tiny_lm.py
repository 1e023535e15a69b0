"""A tiny causal LM and word-level tokenizer built offline, for tests that need a real HF model."""

from __future__ import annotations

from pathlib import Path

import torch

SAMPLE_TEXT = """\
The river runs past the old mill and under the stone bridge. In the spring the water is high and fast,
and the children watch it from the bank. In the summer the water is low, and the children walk across
the stones to the other side. The miller says the river was here long before the mill, and it will be
here long after the mill is gone.

A small boat sits in the reeds near the bridge. Nobody knows who left it there. Some say a fisherman
lost it in a storm; others say a boy from the village hid it so that his father would not sell it.
The boat has a red stripe and a name painted on the side, but the name has faded in the sun.

Every morning the baker opens her shop at six. She makes bread, small cakes and a pie with apples
from the hill. The first people in the shop are the farmers, who buy bread for the day and talk about
the weather. When it rains they stay longer, drink tea by the window and tell old stories about the
river, the mill and the boat in the reeds.

At night the village is quiet. The lights go out one by one, and the only sound is the water under
the bridge. A cat walks along the wall, stops, listens, and goes home. Tomorrow the baker will open
her shop again, the farmers will come for bread, and the river will run past the mill as it always has.
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['role'] }} : {{ message['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s> assistant :{% endif %}"
)


def make_tokenizer(vocab_words: list[str] | None = None):
    """A word-level fast tokenizer trained on SAMPLE_TEXT, or with exactly ``vocab_words`` as its words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(vocab_words)] if vocab_words is not None else [SAMPLE_TEXT]
    corpus.append("user assistant system :")
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_lm(folder: Path, arch: str = "llama", vocab_words: list[str] | None = None, seed: int = 0) -> Path:
    """Save a tiny randomly initialised Llama or Qwen3 causal LM and its tokenizer into ``folder``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    tokenizer = make_tokenizer(vocab_words)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen3":
        config = Qwen3Config(head_dim=8, **common)
    else:
        raise ValueError(f"unknown tiny LM arch {arch!r}; expected 'llama' or 'qwen3'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
