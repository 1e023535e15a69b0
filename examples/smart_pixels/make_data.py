"""Synthetic smart-pixel clusters: charge profiles of tracks crossing a thin pixel sensor: ``pixels.npz``.

A charged track crosses a 100 um thick sensor with 50 um x 12.5 um pixels (13 rows x 22 columns) in a magnetic
field. Its crossing angle in x (the bending plane) grows with charge/pT plus a Lorentz-drift offset, so
low-pT tracks leave wide clusters in x; its angle in y depends on where the module sits (y-local) and where along
the beam the track started. Charge is deposited along the path with Landau-like fluctuations, diffuses, is
digitised with noise and a 400 e threshold, and is read out as two projections. The label is the on-sensor
filter's target: pT above 2 GeV (about a fifth of the tracks).

Keys: ``x_xz`` (N, 22) float32, charge per column in ke (summed over rows); ``x_yl`` (N, 14) float32, charge
per row in ke (summed over columns), then y-local in mm; ``y`` (N,) int64, 1 = high pT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROWS, COLS = 13, 22
PITCH_X, PITCH_Y, THICKNESS = 50.0, 12.5, 100.0  # um
PT_CUT = 2.0  # GeV
POINTS = 48  # charge deposits sampled along each track


def make(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` clusters as the arrays written to ``pixels.npz``."""
    rng = np.random.default_rng(seed)
    pt = 1.0 / rng.uniform(1 / 10.0, 1 / 0.5, n)  # flat in 1/pT: mostly soft tracks
    q = rng.choice([-1.0, 1.0], n)
    y_local = rng.uniform(-8.0, 8.0, n)  # mm along the module
    z_vtx = rng.normal(0.0, 3.0, n)  # mm: where along the beam the track started
    cot_a = 1.0 * q / pt + 0.1 + rng.normal(0, 0.02, n)  # bending + Lorentz drift
    cot_b = (y_local - z_vtx) / 30.0 + rng.normal(0, 0.02, n)  # module 30 mm from the beam

    # Entry point within the central pixel, path through the sensor thickness.
    x0 = (COLS / 2 + rng.uniform(-0.5, 0.5, n)) * PITCH_X - 0.5 * THICKNESS * cot_a
    y0 = (ROWS / 2 + rng.uniform(-0.5, 0.5, n)) * PITCH_Y - 0.5 * THICKNESS * cot_b
    s = (np.arange(POINTS) + 0.5) / POINTS  # fraction of the depth
    depth_diffusion = 2.0 + 6.0 * (1 - s)  # um: charge made near the top drifts further
    px = x0[:, None] + s[None] * THICKNESS * cot_a[:, None] + rng.normal(0, 1, (n, POINTS)) * depth_diffusion
    py = y0[:, None] + s[None] * THICKNESS * cot_b[:, None] + rng.normal(0, 1, (n, POINTS)) * depth_diffusion
    path = THICKNESS * np.sqrt(1 + cot_a**2 + cot_b**2)  # um
    landau = rng.gumbel(1.0, 0.35, (n, POINTS)).clip(0.2, None)  # delta rays: occasional big deposits
    charge = landau / landau.mean(1, keepdims=True) * (path * 75.0 * rng.uniform(0.8, 1.2, n))[:, None] / POINTS

    col = np.floor(px / PITCH_X).astype(int)
    row = np.floor(py / PITCH_Y).astype(int)
    inside = (col >= 0) & (col < COLS) & (row >= 0) & (row < ROWS)
    grid = np.zeros((n, ROWS, COLS))
    idx = np.nonzero(inside)
    np.add.at(grid, (idx[0], row[inside], col[inside]), charge[inside])
    grid += rng.normal(0, 100.0, grid.shape)  # electronics noise, electrons
    grid[grid < 400.0] = 0.0  # zero suppression
    grid = np.round(grid / 50.0) * 50.0 / 1000.0  # 50 e ADC steps, in ke

    return {
        "x_xz": grid.sum(axis=1).astype(np.float32),
        "x_yl": np.concatenate([grid.sum(axis=2), np.round(y_local, 3)[:, None]], axis=1).astype(np.float32),
        "y": (pt > PT_CUT).astype(np.int64),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("pixels.npz"))
    p.add_argument("--n", type=int, default=20000, help="clusters")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    data = make(a.n, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **data)
    print(f"wrote {a.out}: x_xz {data['x_xz'].shape}, x_yl {data['x_yl'].shape}, {data['y'].mean():.1%} high pT")


if __name__ == "__main__":
    main()
