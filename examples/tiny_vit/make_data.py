"""Synthetic 32x32 RGB pattern images, 10 classes, shaped like a small CIFAR-style set: ``images.npz``.

Classes are textures (horizontal, vertical and both diagonal stripes, a checkerboard) and shapes (disk, ring,
square, cross, triangle). Colours of foreground and background are random per image, so the class is in the
geometry, not the colour; stripe period and phase, shape size and position (random shifts), brightness, a
distractor blob and pixel noise vary too. Pixels are stored as float32 in [0, 1], rounded to 1/255 as decoded
8-bit images are.

Keys: ``x`` (N, 3, 32, 32) float32; ``y`` (N,) int64; ``class_names`` (10,).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SIZE = 32
CLASS_NAMES = ["h_stripes", "v_stripes", "diag_stripes", "anti_diag_stripes", "checker", "disk", "ring", "square",
               "cross", "triangle"]  # fmt: skip


def mask(c: int, rng: np.random.Generator) -> np.ndarray:
    """Foreground mask (SIZE, SIZE) in [0, 1] of one class-``c`` pattern."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    cy, cx = SIZE / 2 + rng.uniform(-4, 4, 2)
    if c <= 4:  # textures fill the frame
        period, phase = rng.uniform(4.0, 9.0), rng.uniform(0, 2 * np.pi)
        coord = {0: yy, 1: xx, 2: (xx + yy) / np.sqrt(2), 3: (xx - yy) / np.sqrt(2)}.get(c)
        if c == 4:
            cell = rng.uniform(3.0, 6.0)
            return ((np.floor((xx - cx) / cell) + np.floor((yy - cy) / cell)) % 2).astype(float)
        return (np.sin(2 * np.pi * coord / period + phase) > 0).astype(float)
    r = rng.uniform(9.0, 13.0)
    dx, dy = xx - cx, yy - cy
    if c == 5:
        return (np.hypot(dx, dy) < r).astype(float)
    if c == 6:
        return (np.abs(np.hypot(dx, dy) - r) < rng.uniform(2.0, 3.5)).astype(float)
    if c == 7:
        return ((np.abs(dx) < r * 0.85) & (np.abs(dy) < r * 0.85)).astype(float)
    if c == 8:
        w = rng.uniform(2.0, 3.5)
        return (((np.abs(dx) < w) & (np.abs(dy) < r)) | ((np.abs(dy) < w) & (np.abs(dx) < r))).astype(float)
    if c == 9:  # upward triangle
        return ((dy < r * 0.7) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.6)).astype(float)
    raise ValueError(c)


def make(n: int, seed: int = 0, noise: float = 0.0) -> dict[str, np.ndarray]:
    """``n`` images (balanced classes) as the arrays written to ``images.npz``."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % len(CLASS_NAMES))
    x = np.zeros((n, 3, SIZE, SIZE))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i, c in enumerate(y):
        fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        while np.abs(fg - bg).sum() < 0.6:  # keep some contrast
            fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        m = mask(int(c), rng)
        img = bg[:, None, None] * (1 - m) + fg[:, None, None] * m
        by, bx, br = rng.uniform(0, SIZE, 2).tolist() + [rng.uniform(1.5, 3.5)]  # distractor blob
        blob = np.hypot(yy - by, xx - bx) < br
        img[:, blob] = rng.uniform(0, 1, 3)[:, None]
        img = img * rng.uniform(0.7, 1.2) + rng.normal(0, noise, img.shape)
        x[i] = img
    x = np.round(np.clip(x, 0, 1) * 255) / 255
    return {"x": x.astype(np.float32), "y": y.astype(np.int64), "class_names": np.array(CLASS_NAMES)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("images.npz"))
    p.add_argument("--n", type=int, default=6000, help="images (balanced over 10 classes)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    data = make(a.n, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **data)
    print(f"wrote {a.out}: x {data['x'].shape}, {len(CLASS_NAMES)} classes")


if __name__ == "__main__":
    main()
