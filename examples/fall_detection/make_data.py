"""Synthetic waist-worn accelerometer windows for fall detection, imbalanced like real recordings: ``fall.npz``.

2.56 s windows at 50 Hz (3 axes, in g, rounded to 1/1024 g as a 16-bit sensor reports them). About 15% are
falls: a free-fall dip towards 0 g, an impact spike (hard or soft), then the orientation of someone lying or
kneeling. The rest are activities of daily living, including the hard negatives a fall detector trips on:
jogging (impact-like peaks), jumping (a real free-fall dip and landing spike, upright after), a recovered
stumble, sitting down (tilt plus a bump) and lying down slowly (the lying orientation without the impact).
Twenty subjects differ in how the sensor is mounted (rotation), gait frequency and vigour, sensor gain and noise.

Keys: ``x`` (N, 3, 128) float32; ``y`` (N,) int64, 1 = fall; ``groups`` (N,) int64 subject id. No ``split``:
the loader splits by subject, so test subjects are unseen.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

RATE, SAMPLES, SUBJECTS = 50, 128, 20
ADL = {"walking": 0.30, "jogging": 0.08, "standing": 0.17, "sitting_down": 0.15, "lying_down": 0.10,
       "jumping": 0.08, "stumble": 0.12}  # fmt: skip
FALL_FRACTION = 0.15


def rotation(pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3): pitch about the x axis (forward/back), then roll about z (sideways)."""
    cp, sp, cr, sr = np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    one, zero = np.ones_like(pitch), np.zeros_like(pitch)
    rx = np.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).reshape(pitch.shape + (3, 3))
    rz = np.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).reshape(pitch.shape + (3, 3))
    return rz @ rx


def smoothstep(t: np.ndarray, start: float, duration: float) -> np.ndarray:
    u = np.clip((t - start) / duration, 0.0, 1.0)
    return u * u * (3 - 2 * u)


def pulse(t: np.ndarray, at: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((t - at) / width) ** 2)


def gait(t: np.ndarray, freq: float, amp: float, rng: np.random.Generator) -> np.ndarray:
    """Dynamic acceleration (samples, 3) of walking or jogging at step frequency ``freq``: vertical bounce with
    heel-strike harmonics, forward surge, lateral sway at half the step frequency."""
    ph = rng.uniform(0, 2 * np.pi)
    w = 2 * np.pi * freq * t + ph
    vertical = amp * (np.sin(w) + 0.4 * np.sin(2 * w + 0.5) + 0.2 * np.maximum(0, np.sin(w)) ** 8 * 3)
    forward = 0.5 * amp * np.sin(w + 1.2)
    lateral = 0.35 * amp * np.sin(0.5 * w)
    return np.stack([lateral, vertical, forward], -1)


def window(kind: str, sub: dict, rng: np.random.Generator) -> np.ndarray:
    """One (samples, 3) window of specific force in the body frame (standing: +1 g on the y axis)."""
    t = np.arange(SAMPLES) / RATE
    pitch, roll = np.zeros(SAMPLES), np.zeros(SAMPLES)
    dyn = np.zeros((SAMPLES, 3))
    scale = np.ones(SAMPLES)  # magnitude of gravity's share (free fall removes it)
    at = rng.uniform(0.4, 2.2)  # when the event happens (near an edge, half of it is missing)
    if kind == "walking":
        dyn += gait(t, sub["step_hz"] * rng.uniform(0.9, 1.1), 0.22 * sub["vigour"] * rng.uniform(0.7, 1.3), rng)
        pitch += 0.05 * np.sin(2 * np.pi * sub["step_hz"] * t)
    elif kind == "jogging":
        dyn += gait(t, 1.45 * sub["step_hz"] * rng.uniform(0.9, 1.1), 0.6 * sub["vigour"] * rng.uniform(0.8, 1.3), rng)
        pitch += 0.15
    elif kind == "standing":
        pitch += rng.normal(0, 0.05) + 0.02 * np.sin(2 * np.pi * 0.3 * t)
        dyn += rng.normal(0, 0.03, (SAMPLES, 3))
    elif kind == "sitting_down":
        pitch += -rng.uniform(0.3, 0.8) * smoothstep(t, at - 0.5, rng.uniform(0.6, 1.0))
        dyn[:, 1] += rng.uniform(0.3, 2.0) * pulse(t, at + 0.3, 0.05)  # up to a hard plop onto the chair
        dyn[:, 1] -= 0.3 * pulse(t, at, 0.2)
    elif kind == "lying_down":
        pitch += -rng.uniform(1.0, 1.6) * smoothstep(t, at - 0.8, rng.uniform(0.4, 1.8))
        roll += rng.normal(0, 0.3) * smoothstep(t, at - 0.8, 1.5)
        flop = rng.uniform(0.0, 1.0)  # from lying down carefully to flopping onto a bed
        scale -= 0.4 * flop * pulse(t, at + 0.65, 0.08)
        dyn[:, 1] += (0.1 + 1.5 * flop) * pulse(t, at + 0.8, 0.06)
    elif kind == "jumping":
        air = rng.uniform(0.2, 0.35)
        dyn[:, 1] += 0.8 * pulse(t, at - 0.15, 0.06)  # push-off
        scale -= 0.9 * ((t > at) & (t < at + air))
        dyn[:, 1] += rng.uniform(1.5, 3.5) * pulse(t, at + air + 0.03, 0.03)
        dyn += gait(t, sub["step_hz"], 0.05, rng)
    elif kind == "stumble":
        dyn += gait(t, sub["step_hz"], 0.2 * sub["vigour"], rng)
        scale -= rng.uniform(0.2, 0.5) * pulse(t, at, 0.08)
        dyn[:, 1] += rng.uniform(0.8, 2.0) * pulse(t, at + 0.15, 0.04)
        pitch += rng.uniform(0.2, 0.5) * pulse(t, at + 0.2, 0.15)
    elif kind == "fall":
        if rng.random() < 0.5:  # walking into the fall, standing otherwise
            dyn += gait(t, sub["step_hz"], 0.2 * sub["vigour"], rng) * (t < at)[:, None]
        drop = rng.uniform(0.25, 0.6)
        scale -= rng.uniform(0.05, 0.85) * smoothstep(t, at - drop, drop * 0.5) * (t < at)
        soft = rng.random() < 0.4  # onto a bed or knees first: a weak impact
        peak = rng.uniform(0.7, 1.8) if soft else rng.uniform(1.8, 5.0)
        axis = rng.choice(3, p=[0.25, 0.5, 0.25])
        ring = pulse(t, at, 0.035) + 0.3 * pulse(t, at + 0.12, 0.04)
        dyn[:, axis] += peak * ring * rng.choice([-1.0, 1.0])
        dyn[:, 1] += 0.6 * peak * ring
        final = rng.uniform(0.9, 1.6) if rng.random() < 0.7 else rng.uniform(0.3, 0.8)  # lying or kneeling
        direction = rng.choice([-1.0, 1.0])
        if rng.random() < 0.5:
            pitch += direction * final * smoothstep(t, at - drop, drop + 0.05)
        else:
            roll += direction * final * smoothstep(t, at - drop, drop + 0.05)
        if rng.random() < 0.2:  # gets up again within the window
            back = smoothstep(t, at + rng.uniform(0.6, 1.2), 0.6)
            pitch *= 1 - back
            roll *= 1 - back
        dyn += rng.normal(0, 0.05, (SAMPLES, 3)) * (t > at)[:, None]  # small movements after landing
    else:
        raise ValueError(kind)
    gravity = np.einsum("tij,j->ti", np.transpose(rotation(pitch, roll), (0, 2, 1)), [0.0, 1.0, 0.0])
    return gravity * scale[:, None] + dyn


def make(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` windows (15% falls) over 20 subjects, as the arrays written to ``fall.npz``."""
    rng = np.random.default_rng(seed)
    subjects = [
        {"mount": (rng.normal(0, 0.2), rng.normal(0, 0.2)), "step_hz": rng.uniform(1.6, 2.2),
         "vigour": rng.uniform(0.7, 1.3), "gain": rng.uniform(0.95, 1.05, 3), "noise": rng.uniform(0.04, 0.1)}
        for _ in range(SUBJECTS)
    ]  # fmt: skip
    n_fall = int(round(FALL_FRACTION * n))
    kinds = ["fall"] * n_fall + list(rng.choice(list(ADL), n - n_fall, p=list(ADL.values())))
    kinds = [kinds[i] for i in rng.permutation(n)]
    groups = rng.integers(0, SUBJECTS, n)
    x = np.zeros((n, 3, SAMPLES))
    for i, (kind, g) in enumerate(zip(kinds, groups, strict=True)):
        sub = subjects[g]
        w = window(kind, sub, rng) @ rotation(*map(np.asarray, sub["mount"])).T  # how the sensor sits on the belt
        w = w * sub["gain"] + rng.normal(0, sub["noise"], w.shape)
        x[i] = w.T
    x = np.round(np.clip(x, -8, 8) * 1024) / 1024  # +-8 g range, 1/1024 g resolution
    return {
        "x": x.astype(np.float32),
        "y": np.array([k == "fall" for k in kinds], dtype=np.int64),
        "groups": groups.astype(np.int64),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("fall.npz"))
    p.add_argument("--n", type=int, default=3000, help="windows (15%% of them falls)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    data = make(a.n, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **data)
    print(f"wrote {a.out}: x {data['x'].shape}, {int(data['y'].sum())} falls, {SUBJECTS} subjects")


if __name__ == "__main__":
    main()
