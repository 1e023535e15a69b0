"""Synthetic waist-worn IMU windows labelled with walking speed, for regression: ``speed.npz``.

2 s windows at 32 Hz of a 3-axis accelerometer (g) and 3-axis gyroscope (rad/s). Faster walking means a higher
step frequency (also set by leg length, which differs between subjects), a larger vertical bounce (also set by
how vigorously the subject walks) and faster trunk rotation; the speed may drift a little within a window and
the target is its mean as timing gates measure it (+-0.1 m/s). Thirty subjects differ in leg length, vigour and
how the sensor sits on the belt; sensor noise on top. No single cue gives the speed: the model has to combine
frequency and amplitude.

Keys: ``x`` (N, 6, 64) float32 (acc x, y, z, gyro x, y, z); ``y`` (N,) float32 speed in m/s; ``groups`` (N,)
int64 subject id (the loader splits by subject).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

RATE, SAMPLES, SUBJECTS = 32, 64, 30


def make(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` windows as the arrays written to ``speed.npz``."""
    rng = np.random.default_rng(seed)
    leg = rng.uniform(0.75, 1.05, SUBJECTS)  # m
    vigour = rng.uniform(0.6, 1.4, SUBJECTS)
    tilt = rng.normal(0, 0.15, (SUBJECTS, 2))
    groups = rng.integers(0, SUBJECTS, n)
    t = np.arange(SAMPLES) / RATE

    v0 = rng.uniform(0.5, 2.0, n)
    dv = rng.normal(0, 0.08, n)  # speed change over the window
    v = v0[:, None] + dv[:, None] * (t[None] / t[-1] - 0.5)  # (n, samples)
    step_hz = (0.9 + 0.75 * v / leg[groups, None] * 0.9) * rng.uniform(0.9, 1.1, n)[:, None]
    phase = 2 * np.pi * np.cumsum(step_hz, axis=1) / RATE + rng.uniform(0, 2 * np.pi, n)[:, None]
    amp = vigour[groups, None] * rng.uniform(0.75, 1.25, n)[:, None]

    acc_v = 1.0 + amp * (0.1 + 0.22 * v**2) * (np.sin(phase) + 0.3 * np.sin(2 * phase + 0.7))
    acc_f = amp * (0.05 + 0.12 * v) * np.sin(phase + 1.3)
    acc_l = amp * (0.04 + 0.05 * v) * np.sin(0.5 * phase)
    gyro_pitch = (0.2 + 0.5 * v / leg[groups, None]) * rng.uniform(0.8, 1.2, n)[:, None] * np.cos(phase + 0.4)
    gyro_yaw = (0.1 + 0.15 * v) * np.sin(0.5 * phase + 0.3)
    gyro_roll = (0.05 + 0.1 * v) * np.cos(0.5 * phase)
    acc = np.stack([acc_l, acc_v, acc_f], axis=1)  # (n, 3, samples)
    gyro = np.stack([gyro_pitch, gyro_yaw, gyro_roll], axis=1)

    a, b = tilt[groups, 0], tilt[groups, 1]  # how the sensor sits: mixes the vertical into the other axes
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0], rot[:, 0, 1] = np.cos(a), -np.sin(a)
    rot[:, 1, 0], rot[:, 1, 1], rot[:, 1, 2] = np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), -np.sin(b)
    rot[:, 2, 0], rot[:, 2, 1], rot[:, 2, 2] = np.sin(a) * np.sin(b), np.cos(a) * np.sin(b), np.cos(b)
    acc = rot @ acc + rng.normal(0, 0.03, acc.shape)
    gyro = rot @ gyro + rng.normal(0, 0.06, gyro.shape)
    x = np.concatenate([np.round(acc * 4096) / 4096, np.round(gyro * 1024) / 1024], axis=1)
    speed = v.mean(axis=1) + rng.normal(0, 0.1, n)  # the reference (timing gates) has its own error
    return {"x": x.astype(np.float32), "y": speed.astype(np.float32), "groups": groups.astype(np.int64)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("speed.npz"))
    p.add_argument("--n", type=int, default=3000, help="windows")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    data = make(a.n, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **data)
    print(f"wrote {a.out}: x {data['x'].shape}, speed {data['y'].min():.2f}-{data['y'].max():.2f} m/s, "
          f"{SUBJECTS} subjects")  # fmt: skip


if __name__ == "__main__":
    main()
