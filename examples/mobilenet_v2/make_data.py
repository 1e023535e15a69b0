"""The resnet_cnn example's 16x16 RGB thumbnails of six shapes (``shapes.npz``), made by its own generator so
both examples train on the same kind of images. Same options: ``--out``, ``--n``, ``--seed``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SHAPES = Path(__file__).resolve().parents[1] / "resnet_cnn" / "make_data.py"


def main(argv: list[str] | None = None) -> None:
    spec = importlib.util.spec_from_file_location("resnet_cnn_shapes", SHAPES)
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    argv = sys.argv[1:] if argv is None else argv
    if not any(a == "--out" or a.startswith("--out=") for a in argv):  # default: beside this file, not resnet_cnn's
        argv = [*argv, "--out", str(Path(__file__).with_name("shapes.npz"))]
    shapes.main(argv)


if __name__ == "__main__":
    main()
