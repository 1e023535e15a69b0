"""Knowledge distillation from a KD cache as a training task for the shared loop (``train.fit``).

A batch is a dict from ``KDCache``. The student runs its transformer body once and computes logits only at
the cached candidate ids (teacher top-K ∪ random negatives); full-vocabulary logits are computed only when
``hard_full`` > 0 in training, and always in evaluation, where the true next token gives a perplexity.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from qatkit.lm.kd_loss import candidate_kl, candidate_logits, kd_loss
from qatkit.lm.perplexity import from_nll, next_token_nll


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (returns hidden states) and the output layer of a Hugging Face causal LM."""
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        raise ValueError(f"{type(model).__name__} has no separate body and lm_head; expected a *ForCausalLM model")
    return body, head


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class KDTask:
    """KD loss on cached teacher candidates (seed 004): KL at a temperature + hard top-1 + hard full-vocab CE."""

    val_fields = ["val_loss", "val_kl", "val_kl_t1", "val_top1_agreement", "val_nll", "val_perplexity"]
    val_batch_size = 2
    """Evaluation computes full-vocabulary logits: for SmolLM2, 8 sequences of 128 tokens would be 200 MB (and
    as much again for their log-softmax), the largest allocation of a memory-lean run; 2 at a time is a quarter."""
    monitor = "loss"
    """The best epoch is the one with the lowest evaluation KD loss (KD has no accuracy)."""

    def __init__(self, temperature: float = 2.0, hard_top1: float = 0.2, hard_full: float = 5e-5):
        self.temperature, self.hard_top1, self.hard_full = temperature, hard_top1, hard_full

    def terms(self, model: nn.Module, batch: dict, device: str, full: bool) -> tuple[dict, torch.Tensor | None]:
        """KD loss terms for one batch, and the full-vocabulary logits when ``full``."""
        body, head = body_and_head(_unwrap(model))
        ids = batch["input_ids"].to(device)
        hidden = body(input_ids=ids).last_hidden_state[:, :-1]
        cand = torch.cat([batch["topk_ids"], batch["neg_ids"]], -1).to(device)
        teacher = torch.cat([batch["topk_logits"], batch["neg_logits"]], -1).to(device)
        student = candidate_logits(hidden, head.weight, cand, getattr(head, "bias", None))
        logits = head(hidden) if full else None
        out = kd_loss(student, teacher, temperature=self.temperature, hard_top1=self.hard_top1,
                      hard_full=self.hard_full if full else 0.0, student_full_logits=logits,
                      teacher_top1_ids=batch["topk_ids"][..., 0].to(device))  # fmt: skip
        out["agree"] = (student.argmax(-1) == 0).float().mean()
        if logits is not None:  # the student's own top-1 over the whole vocabulary, against the teacher's
            out["agree"] = (logits.argmax(-1) == batch["topk_ids"][..., 0].to(device)).float().mean()
            out["kl_t1"] = candidate_kl(student.float(), teacher.float()).mean()
        return out, logits

    def lower_is_better(self, metric: str) -> bool:
        return metric != "top1_agreement"

    def collapse_points(self, metrics: dict) -> float | None:
        return None  # KD losses have no share metric to watch: the non-finite guards still apply

    def loss(self, model: nn.Module, batch: dict, device: str) -> tuple[torch.Tensor, int]:
        out, _ = self.terms(model, batch, device, full=self.hard_full > 0)
        return out["loss"], len(batch["input_ids"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: str) -> dict:
        """Mean KD loss, KL at the training temperature (times T^2, as in the loss) and at T=1, the share of
        positions where the student's top-1 token over the whole vocabulary is the teacher's, and NLL /
        perplexity of the true next tokens."""
        was = model.training
        model.eval()
        sums = {"loss": 0.0, "kl": 0.0, "kl_t1": 0.0, "top1_agreement": 0.0, "nll": 0.0}
        n = tokens = 0
        for batch in loader:
            out, logits = self.terms(model, batch, device, full=True)
            b = len(batch["input_ids"])
            total, count = next_token_nll(logits, batch["input_ids"].to(device))
            sums["nll"] += total
            tokens += count
            for k, key in (("loss", "loss"), ("kl", "kl"), ("kl_t1", "kl_t1"), ("top1_agreement", "agree")):
                sums[k] += float(out[key]) * b
            n += b
        model.train(was)
        m = {k: v / max(n, 1) for k, v in sums.items() if k != "nll"}
        m["nll"] = sums["nll"] / max(tokens, 1)
        m["perplexity"] = from_nll(m["nll"])
        return m
