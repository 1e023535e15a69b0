"""Text generation with a Hugging Face causal LM: one prompt to text, or an interactive prompt loop.

Transformers is not imported here; the model and tokenizer are passed in, so this module loads without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

EXIT_WORDS = ("exit", "quit")


class _CallbackStreamer:
    """A ``generate`` streamer that decodes the new tokens incrementally and hands each new text piece to a callback."""

    def __init__(self, tokenizer: Any, callback: Callable[[str], Any]):
        self.tokenizer = tokenizer
        self.callback = callback
        self.ids: list[int] = []
        self.sent = ""
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.callback(text[len(self.sent) :])
            self.sent = text


def prompt_ids(tokenizer: Any, prompt: str | None, chat: bool | None) -> torch.Tensor:
    """Token ids (1, L) of the prompt, wrapped in the chat template when asked or, for ``chat=None``, when there is
    one; no prompt (or one that encodes to nothing) starts from the BOS token."""
    if prompt is None:
        prompt, chat = "", False
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template
    if chat:
        if not has_template:
            raise ValueError("chat=True but the tokenizer has no chat_template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[-1] == 0:
        if tokenizer.bos_token_id is None:
            raise ValueError(
                "no prompt (or one that encodes to no tokens) and the tokenizer has no BOS token to "
                "start from: give prompts"
            )
        ids = torch.tensor([[tokenizer.bos_token_id]])
    return ids


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_tokens: int = 128,
    temperature: float = 0.6,
    repetition_penalty: float = 1.1,
    chat: bool | None = None,
    seed: int = 0,
    stream: Callable[[str], Any] | None = None,
) -> str:
    """Continue ``prompt`` with up to ``max_tokens`` new tokens and return only the new text.

    ``temperature=0`` decodes greedily; otherwise sampling is seeded with ``seed``. ``stream`` receives text pieces as they come.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, chat).to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = dict(max_new_tokens=max_tokens, repetition_penalty=repetition_penalty, pad_token_id=pad_id)
    if temperature == 0:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=temperature)
        torch.manual_seed(seed)
    if stream is not None:
        kwargs["streamer"] = _CallbackStreamer(tokenizer, stream)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[-1] :].tolist(), skip_special_tokens=True)


def interactive(
    model: Any,
    tokenizer: Any,
    *,
    read: Callable[[str], str] = input,
    write: Callable[[str], Any] = print,
    **gen_kwargs: Any,
) -> None:
    """Answer prompts one at a time (no history) until end of input, an empty line, "exit" or "quit".

    With a ``stream`` callback in ``gen_kwargs`` the answer is shown by it, and ``write("")`` only ends the line.
    """
    while True:
        try:
            prompt = read("> ")
        except (EOFError, KeyboardInterrupt):
            return
        if not prompt.strip() or prompt.strip().lower() in EXIT_WORDS:
            return
        answer = generate_text(model, tokenizer, prompt, **gen_kwargs)
        write("" if gen_kwargs.get("stream") is not None else answer)
