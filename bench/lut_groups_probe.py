"""Probe: one LUT per layer vs one LUT per output row for SmolLM2 Q2_A4, 40 KD steps each (plain AdamW loop).

Prints held-out perplexity (first 16 windows of length 256 of the held-out licences) after PTQ and after
``STEPS`` steps of KD on the bench's licences+copyright cache (build it first with bench/lm_kd.py).

    .venv/bin/python bench/lut_groups_probe.py tensor 40 5e-4 8
    .venv/bin/python bench/lut_groups_probe.py row 40 5e-4 8
"""

import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from qatkit.lm.cache import KDCache
from qatkit.lm.corpus import read_texts, tokenize_corpus
from qatkit.lm.hf import load_causal_lm
from qatkit.lm.kd_task import KDTask
from qatkit.lm.perplexity import perplexity
from qatkit.lm.rules import ATTENTION_PATTERNS, MLP_PATTERNS, LMQuantConfig, LUTRule, lut_layers, prepare_lm

CACHE = "runs/bench_lm_kd/cache_licences+copyright_L128_K64_R64_N2400"

torch.set_num_threads(2)
lic = Path("/usr/share/common-licenses")
model, tok = load_causal_lm("smollm2")
ev = tokenize_corpus(read_texts([lic / n for n in ["GFDL-1.2", "GFDL-1.3", "MPL-1.1", "MPL-2.0"]]), tok, 256)[:16]
ds = KDCache(CACHE, tok, "train")
variant, steps, lr, bs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rows = 1 if "row" in variant else None
cfg = LMQuantConfig(preset=None, rules=[
    LUTRule(name="mlp", match=MLP_PATTERNS, bits=2, rank=32, group_rows=rows),
    LUTRule(name="attn", match=ATTENTION_PATTERNS, bits=4, rank=8, group_rows=rows, attention=True)])  # fmt: skip
prepare_lm(model, cfg)
if "nograd" in variant:  # e.g. row-nograd: no scale gradient through the normaliser W / (A @ B)
    for m in lut_layers(model).values():
        m.spec = dataclasses.replace(m.spec, normalizer_grad=False)
print(variant, "ptq", perplexity(model, ev)["perplexity"], flush=True)
task = KDTask(hard_full=0.0)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
model.train()
i, t0 = 0, time.time()
while i < steps:
    for b in DataLoader(ds, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(i)):
        loss, _ = task.loss(model, b, "cpu")
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        sched.step()
        opt.zero_grad()
        i += 1
        if i % 10 == 0:
            print(i, round(loss.item(), 3), round(time.time() - t0), f"grad_norm {norm:.1f}", flush=True)
        if i >= steps:
            break
print(variant, "after", steps, perplexity(model, ev)["perplexity"], flush=True)
