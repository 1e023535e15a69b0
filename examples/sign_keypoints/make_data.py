"""Synthetic isolated-sign keypoint clips shaped like MediaPipe hand landmarks: ``sign.npz``.

Each of 8 signs is a hand shape (finger curls) plus a wrist trajectory and a hand rotation over time; some signs
share a motion and differ only in hand shape (please/sorry), others share a shape. Four signers differ in where
and how big they sign, how fast, how wide and how lax their hand shapes are; every clip also gets time jitter
(start, duration), amplitude and position jitter, landmark noise and a few dropped frames (all-zero landmarks,
as a tracker reports a missed detection). Signer 4 is held out as the test set (a signer-independent split, as
sign-language papers report); validation is a stratified 15% of signers 1-3.

Keys: ``x`` (N, frames, 42) float32, normalised image coordinates x0, y0, x1, y1, ... of 21 landmarks;
``y`` (N,) int64 sign index; ``groups`` (N,) signer name; ``split`` (N,) 'train' / 'val' / 'test';
``class_names`` (8,) sign glosses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FRAMES = 24
SIGNERS = 4
CLASS_NAMES = ["hello", "thanks", "yes", "no", "please", "sorry", "more", "help"]

# Finger curls (thumb, index, middle, ring, pinky): 0 straight, 1 fully curled.
SHAPES = {
    "open": [0.0, 0.0, 0.0, 0.0, 0.0],
    "flat": [0.7, 0.0, 0.0, 0.0, 0.0],
    "fist": [0.8, 1.0, 1.0, 1.0, 1.0],
    "v": [0.8, 0.0, 0.0, 1.0, 1.0],
    "pinch": [0.5, 0.6, 0.1, 0.1, 0.1],
    "thumb": [0.0, 1.0, 1.0, 1.0, 1.0],
}
# sign -> (hand shape, motion, base hand rotation in degrees)
SIGNS = [
    ("open", "wave", 0),
    ("flat", "down", 20),
    ("fist", "nod", 0),
    ("v", "shake", 0),
    ("open", "circle", 10),
    ("flat", "circle", 10),
    ("pinch", "diagonal", -20),
    ("thumb", "up", 0),
]
BASE_ANGLES = np.radians([-55.0, -20.0, 0.0, 15.0, 30.0])  # finger directions from "up", palm facing the camera
BASE_LENGTHS = np.array([0.22, 0.45, 0.47, 0.45, 0.42])  # wrist -> finger base
SEGMENTS = np.array([[0.16, 0.13, 0.11], [0.22, 0.13, 0.10], [0.24, 0.15, 0.11], [0.22, 0.14, 0.10],
                     [0.17, 0.11, 0.09]])  # fmt: skip


def hand_landmarks(curl: np.ndarray) -> np.ndarray:
    """21 landmarks (wrist, then 4 per finger) of a unit hand pointing up, for curls ``curl`` (..., 5)."""
    out = np.zeros(curl.shape[:-1] + (21, 2))
    for f in range(5):
        direction = np.array([np.sin(BASE_ANGLES[f]), np.cos(BASE_ANGLES[f])])
        pos = BASE_LENGTHS[f] * direction * np.ones(curl.shape[:-1] + (2,))
        out[..., 1 + 4 * f, :] = pos
        bend = np.zeros(curl.shape[:-1])
        for s in range(3):
            bend = bend + curl[..., f] * np.radians(75.0)  # each joint bends; the view foreshortens the segment
            if f == 0:  # the thumb folds across the palm instead
                d = np.stack([np.sin(BASE_ANGLES[0] + 1.6 * bend), np.cos(BASE_ANGLES[0] + 1.6 * bend)], -1)
                pos = pos + SEGMENTS[f, s] * d
            else:
                pos = pos + SEGMENTS[f, s] * np.cos(bend)[..., None] * direction
            out[..., 2 + 4 * f + s, :] = pos
    return out


def motion(name: str, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wrist offset (..., 2) in hand-size units and extra rotation (radians) at normalised times ``u`` (0..1)."""
    zero = np.zeros_like(u)
    if name == "wave":
        return np.stack([0.1 * np.sin(2 * np.pi * u), zero], -1), 0.45 * np.sin(4 * np.pi * u)
    if name == "down":
        return np.stack([0.2 * u, 1.3 * u], -1), zero
    if name == "nod":
        return np.stack([zero, 0.5 * np.sin(4 * np.pi * u)], -1), zero
    if name == "shake":
        return np.stack([0.6 * np.sin(3 * np.pi * u), zero], -1), 0.1 * np.sin(3 * np.pi * u)
    if name == "circle":
        a = 2 * np.pi * u
        return np.stack([0.6 * np.sin(a), 0.6 * (1 - np.cos(a))], -1), zero
    if name == "diagonal":
        return np.stack([0.9 * u, -0.9 * u], -1), zero
    if name == "up":
        return np.stack([zero, -1.3 * u], -1), zero
    raise ValueError(name)


def make(n: int, seed: int = 0, noise: float = 0.012) -> dict[str, np.ndarray]:
    """``n`` clips (balanced over signs and signers) as the arrays written to ``sign.npz``."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(SIGNS)
    signer = (np.arange(n) // len(SIGNS)) % SIGNERS
    perm = rng.permutation(n)
    y, signer = y[perm], signer[perm]

    # Signer style: where and how big the hand is, speed, amplitude, rotation bias, hand-shape laxness.
    style = {
        "center": rng.uniform([0.45, 0.5], [0.55, 0.6], (SIGNERS, 2)),
        "size": rng.uniform(0.09, 0.12, SIGNERS),
        "speed": rng.uniform(0.85, 1.15, SIGNERS),
        "amp": rng.uniform(0.7, 1.3, SIGNERS),
        "tilt": rng.normal(0.0, np.radians(8), SIGNERS),
        "lax": rng.uniform(-0.25, 0.25, (SIGNERS, 5)),
        "yaw": rng.normal(0.0, np.radians(15), SIGNERS),
    }
    # Per clip: when the sign starts and how long it lasts, amplitude, position, rotation, curl jitter.
    start = rng.uniform(0.0, 0.2, n)
    length = rng.uniform(0.6, 1.0, n) / style["speed"][signer]
    amp = style["amp"][signer] * rng.uniform(0.75, 1.25, n)
    size = style["size"][signer] * rng.uniform(0.8, 1.2, n)
    center = style["center"][signer] + rng.normal(0.0, 0.05, (n, 2))
    base_rot = np.radians([s[2] for s in SIGNS])[y] + style["tilt"][signer] + rng.normal(0.0, np.radians(10), n)
    curls = np.array([SHAPES[SIGNS[c][0]] for c in y]) + style["lax"][signer] + rng.normal(0.0, 0.2, (n, 5))
    curls = np.clip(curls, 0.0, 1.1)
    squash = np.cos(style["yaw"][signer] + rng.normal(0.0, np.radians(35), n))  # hand turned away from the camera

    t = np.linspace(0.0, 1.0, FRAMES)
    u = np.clip((t[None, :] - start[:, None]) / np.minimum(length, 1.0)[:, None], 0.0, 1.0)  # (n, frames)
    shape = hand_landmarks(curls)  # (n, 21, 2), hand space, y up
    x = np.zeros((n, FRAMES, 21, 2))
    for i in range(n):
        offset, rot = motion(SIGNS[y[i]][1], u[i])
        ang = base_rot[i] + rot  # (frames,)
        c, s = np.cos(ang), np.sin(ang)
        hx = squash[i] * shape[i, :, 0][None] * c[:, None] - shape[i, :, 1][None] * s[:, None]
        hy = squash[i] * shape[i, :, 0][None] * s[:, None] + shape[i, :, 1][None] * c[:, None]
        wrist = center[i] + size[i] * amp[i] * offset  # image space: y grows downwards
        x[i, :, :, 0] = wrist[:, None, 0] + size[i] * hx
        x[i, :, :, 1] = wrist[:, None, 1] - size[i] * hy
    x += rng.normal(0.0, noise, x.shape)
    dropped = rng.random((n, FRAMES)) < 0.05
    x[dropped] = 0.0

    split = np.where(signer == SIGNERS - 1, "test", "train").astype("<U5")
    for c in range(len(SIGNS)):  # stratified 15% of the training signers' clips for validation
        idx = np.flatnonzero((split == "train") & (y == c))
        split[rng.choice(idx, int(round(0.15 * len(idx))), replace=False)] = "val"
    x = np.round(x * 2048) / 2048  # sub-pixel at 1080p; also lets np.savez_compressed shrink the file
    return {
        "x": x.reshape(n, FRAMES, 42).astype(np.float32),
        "y": y.astype(np.int64),
        "groups": np.array([f"signer{s + 1}" for s in signer]),
        "split": split,
        "class_names": np.array(CLASS_NAMES),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("sign.npz"))
    p.add_argument("--n", type=int, default=1600, help="clips (spread evenly over 8 signs x 4 signers)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    data = make(a.n, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, **data)
    counts = {s: int((data["split"] == s).sum()) for s in ("train", "val", "test")}
    print(f"wrote {a.out}: x {data['x'].shape}, {len(CLASS_NAMES)} signs, {SIGNERS} signers, {counts}")


if __name__ == "__main__":
    main()
