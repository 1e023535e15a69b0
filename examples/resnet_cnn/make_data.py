"""Synthetic 16x16 RGB images of six shapes, like thumbnails from a small vision sensor: ``shapes.npz``.

Each image is one shape (disk, square, triangle, plus, ring, bar) in a random colour on a random background
colour with a brightness gradient, randomly sized, shifted and (bars) oriented, plus a small distractor dot and
sensor noise. The class is the geometry alone. Pixels are float32 in [0, 1], rounded to 1/255.

Keys: ``x`` (N, 3, 16, 16) float32; ``y`` (N,) int64; ``class_names`` (6,).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SIZE = 16
CLASS_NAMES = ["disk", "square", "triangle", "plus", "ring", "bar"]


def mask(c: int, rng: np.random.Generator) -> np.ndarray:
    """Soft foreground mask (SIZE, SIZE) of one class-``c`` shape, anti-aliased by 4x supersampling."""
    k = 4
    g = (np.arange(SIZE * k) + 0.5) / k
    yy, xx = np.meshgrid(g, g, indexing="ij")
    cy, cx = SIZE / 2 + rng.uniform(-2.5, 2.5, 2)
    r = rng.uniform(3.5, 6.0)
    dx, dy = xx - cx, yy - cy
    if c == 0:
        m = np.hypot(dx, dy) < r
    elif c == 1:
        m = (np.abs(dx) < 0.85 * r) & (np.abs(dy) < 0.85 * r)
    elif c == 2:
        m = (dy < 0.7 * r) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.6)
    elif c == 3:
        w = rng.uniform(1.0, 1.8)
        m = ((np.abs(dx) < w) & (np.abs(dy) < r)) | ((np.abs(dy) < w) & (np.abs(dx) < r))
    elif c == 4:
        m = np.abs(np.hypot(dx, dy) - r) < rng.uniform(1.0, 1.6)
    elif c == 5:
        a = rng.uniform(0, np.pi)
        u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
        m = (np.abs(u) < 1.3 * r) & (np.abs(v) < rng.uniform(1.0, 1.8))
    else:
        raise ValueError(c)
    return m.reshape(SIZE, k, SIZE, k).mean(axis=(1, 3))


def make(n: int, seed: int = 0, noise: float = 0.1) -> dict[str, np.ndarray]:
    """``n`` images (balanced classes) as the arrays written to ``shapes.npz``."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % len(CLASS_NAMES))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE - 0.5
    x = np.zeros((n, 3, SIZE, SIZE))
    for i, c in enumerate(y):
        fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        while np.abs(fg - bg).sum() < 0.5:  # keep some contrast
            fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        m = mask(int(c), rng)
        img = bg[:, None, None] * (1 - m) + fg[:, None, None] * m
        dot = np.hypot(yy - rng.uniform(-0.5, 0.5), xx - rng.uniform(-0.5, 0.5)) < 0.08  # distractor dot
        img[:, dot] = rng.uniform(0, 1, 3)[:, None]
        light = 1 + rng.uniform(-0.4, 0.4) * yy + rng.uniform(-0.4, 0.4) * xx  # uneven lighting
        x[i] = img * light * rng.uniform(0.7, 1.2) + rng.normal(0, noise, img.shape)
    x = np.round(np.clip(x, 0, 1) * 255) / 255
    return {"x": x.astype(np.float32), "y": y.astype(np.int64), "class_names": np.array(CLASS_NAMES)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("shapes.npz"))
    p.add_argument("--n", type=int, default=4000, help="images (balanced over 6 classes)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    data = make(a.n, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **data)
    print(f"wrote {a.out}: x {data['x'].shape}, {len(CLASS_NAMES)} classes")


if __name__ == "__main__":
    main()
