"""Small reference models behind a name registry (``model.name`` in a recipe).

Every builder takes the data's ``input_shape`` and ``num_classes`` plus the recipe's ``model.args``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field, ValidationError, model_validator
from torch import nn

from qatkit.base.batch import call
from qatkit.base.config import RecipeError, Strict, format_validation_error
from qatkit.components.imports import call_target


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * n -> Linear."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, hidden: list[int] = (256, 128), dropout: float = 0.0
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN1d(nn.Module):
    """Sensor-window classifier: [Conv1d -> BatchNorm -> ReLU] * n -> global average pool -> Linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: list[int] = (16, 32), kernel: int = 5):
        super().__init__()
        layers: list[nn.Module] = []
        c = input_shape[0]
        for out in channels:
            layers += [nn.Conv1d(c, out, kernel, padding=kernel // 2), nn.BatchNorm1d(out), nn.ReLU()]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=-1))


class CNN2d(nn.Module):
    """Small image classifier: [Conv2d 3x3 -> BatchNorm -> ReLU] * n -> global average pool -> Linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: list[int] = (16, 32)):
        super().__init__()
        layers: list[nn.Module] = []
        c = input_shape[0]
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer with BART-style names: q/k/v/out_proj attention, fc1/fc2 FFN."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = nn.functional.scaled_dot_product_attention(
            split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        )
        x = x + self.out_proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Sequence classifier over (channels, steps) inputs: per-step embedding, encoder layers, mean pool."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        dim: int = 32,
        heads: int = 4,
        ffn: int = 64,
        layers: int = 2,
    ):
        super().__init__()
        channels, steps = input_shape[0], int(math.prod(input_shape[1:]))
        self.embed = nn.Linear(channels, dim)
        self.pos = nn.Parameter(torch.zeros(1, steps, dim))
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(2).transpose(1, 2)) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1d,
    "cnn2d": CNN2d,
    "transformer": TinyTransformer,
}

Width = Annotated[int, Field(ge=1, le=1 << 16)]


class MLPArgs(Strict):
    hidden: list[Width] = Field([256, 128], max_length=64)
    dropout: float = Field(0.0, ge=0, lt=1)


class CNN1dArgs(Strict):
    channels: list[Width] = Field([16, 32], min_length=1, max_length=64)
    kernel: int = Field(5, ge=1, le=63)


class CNN2dArgs(Strict):
    channels: list[Width] = Field([16, 32], min_length=1, max_length=64)


class TransformerArgs(Strict):
    dim: Width = 32
    heads: int = Field(4, ge=1, le=256)
    ffn: Width = 64
    layers: int = Field(2, ge=1, le=64)

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerArgs:
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        return self


MODEL_ARGS: dict[str, type[Strict]] = {"mlp": MLPArgs, "cnn1d": CNN1dArgs, "cnn2d": CNN2dArgs,
                                       "transformer": TransformerArgs}  # fmt: skip
"""What each bundled model's ``model.args`` may hold: checked with the recipe, before anything is built."""


def check_model_args(name: str, args: dict) -> dict:
    """``args`` validated against the bundled model's schema; a ValueError names ``args.<key>`` and the bounds."""
    try:
        MODEL_ARGS[name].model_validate(args)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, MODEL_ARGS[name], prefix="args")) from None
    return args


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **args) -> nn.Module:
    """Instantiate a registered model; bad ``args`` raise a ValueError naming the model."""
    try:
        return MODELS[name](tuple(input_shape), num_classes, **check_model_args(name, args))
    except (TypeError, ValueError) as e:
        raise RecipeError(f"model {name!r}: bad args: {e}") from None


def make_model(cfg, input_shape: tuple[int, ...], num_outputs: int, base_dir: Path | None = None) -> nn.Module:
    """The recipe's model (a ``ModelConfig``): bundled by name (given the data's input shape and the task's
    number of outputs), the user's callable with its ``args``, or a Hugging Face folder."""
    if cfg.name is not None:
        return build_model(cfg.name, input_shape, num_outputs, **cfg.args)
    if cfg.hf is not None:
        from qatkit.components.hf import load_hf_classifier

        return load_hf_classifier(Path(cfg.hf) if base_dir is None else _resolve(cfg.hf, base_dir))
    model = call_target(cfg.target, cfg.args, base_dir, "model.target")
    if not isinstance(model, nn.Module):
        raise RecipeError(f"model.target {cfg.target!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _resolve(path: Path, base_dir: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else base_dir / path


TRAINING_COPIES = 4
"""Bytes of training memory per byte of weights: weights, gradients and AdamW's two moments."""


def check_model(build: Callable[[], nn.Module], sample, meta: bool = True, where: str = "model") -> None:
    """Refuse, before any training, a model too large for this machine's memory (with ``meta``, sized on the meta
    device, where nothing is allocated) or one that fails on a batch of the data. Leaves the RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        need = _meta_bytes(build) * TRAINING_COPIES if meta else 0
        have = _available_memory()
        if need and have and need > have:
            raise RecipeError(f"{where}: training needs about {need / 2**30:.1f} GiB (weights, gradients, optimizer "
                              f"state), more than the {have / 2**30:.1f} GiB available; check model.args")  # fmt: skip
        model = build().eval()
        try:
            with torch.no_grad():
                call(model, sample)
        except Exception as e:  # the user's model may raise anything; report it as a recipe problem
            msg = str(e).splitlines()[0][:300] if str(e) else ""
            raise RecipeError(f"{where}: the model fails on a batch of the data ({type(e).__name__}: {msg}); "
                              "check model.args and the data's shape") from None  # fmt: skip


def _meta_bytes(build: Callable[[], nn.Module]) -> int:
    """Bytes of parameters and buffers of the model ``build`` makes, built on the meta device (0 if it cannot)."""
    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # noqa: BLE001 (a model whose constructor needs real tensors is sized when built for real)
        return 0
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
