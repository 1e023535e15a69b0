"""Memory of lm-train: the allocator setting behind ``--lean-memory`` really returns freed blocks to the system,
and it changes nothing a run computes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ONE_THREAD

MAPPED = """
import ctypes, sys, torch
from qatkit.lm.memory import lean_allocator

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "lean":
    assert lean_allocator()
x = torch.ones(1 << 20); del x  # a 4 MB block freed: glibc raises its mmap threshold to 4 MB
before = libc.mallinfo2().hblkhd
big = [torch.ones(1 << 19) for _ in range(50)]  # 100 MB in 2 MB blocks
print((libc.mallinfo2().hblkhd - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)")
def test_lean_allocator_maps_the_blocks_glibc_would_serve_from_its_heap():
    """After a 4 MB block is freed glibc serves 2 MB blocks from its heap, where freed ones stay resident between
    live small ones (what made a SmolLM2 training step's resident set grow ~0.6 GiB beyond its live tensors);
    in lean mode each is its own mapping, unmapped when freed."""
    mapped = {}
    for mode in ("default", "lean"):
        r = subprocess.run([sys.executable, "-c", MAPPED, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        mapped[mode] = float(r.stdout.split()[-1])
    assert mapped["default"] < 5 and mapped["lean"] >= 100, mapped


def test_lean_memory_run_trains_the_same_weights(tiny_lm_dir, kd_cache_dir, tmp_path):
    def run(out, *extra):
        cmd = [sys.executable, "-m", "qatkit", "lm-train", "--cache", str(kd_cache_dir), "--model", str(tiny_lm_dir),
               "--from-scratch", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--no-progress",
               "--out", str(out), *extra]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, **ONE_THREAD))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return json.loads((out / "summary.json").read_text()), load_file(str(out / "model.safetensors"))

    (s1, w1), (s2, w2) = run(tmp_path / "plain"), run(tmp_path / "lean", "--lean-memory")
    assert not s1["lean_memory"] and s2["lean_memory"] and s1["steps"] == s2["steps"] == 3
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
