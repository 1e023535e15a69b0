"""LUTLinear: a Linear layer whose weight is ``lut[index] ⊙ (A @ B)`` — LUT codes times low-rank scales.

Before ``freeze_q`` the float weight is the latent variable: each forward normalises it by the scales, snaps it to
the nearest table entry (straight-through) and rescales, so weight, table and scales all train. After
``freeze_q`` the indices are fixed buffers and only the scales (and the table, if learnable) train; the latent
weight is then released (an empty tensor: 4 bytes per weight less, the indices keep 1). Every piece of state —
table, scales, indices, the frozen flag — is in ``state_dict``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from qatkit.quant.lowrank import FORWARD_MODES, expand_rank, init_scales, lowrank_linear, v1_to_v2, v2_factors
from qatkit.quant.lut import kmeans_lut, lut_fake_quantize, nearest_index, reduce_lut, ste_fp16
from qatkit.quant.lut_matmul import lut_linear

FORMS = ("v1", "v2")
SCALE_NAMES = ("scale_a", "scale_b", "a_dir", "b_dir", "magnitude")  # V1: scale_a, scale_b; V2: the other three
WEIGHTINGS = ("uniform", "magnitude")
_SETTING_TYPES = {"bits": int, "rank": int, "group_rows": (int, type(None)), "form": str, "learnable_lut": bool,
                  "ste_fp16": bool, "kmeans_weighting": str, "normalizer_grad": bool}  # fmt: skip


@dataclass(frozen=True)
class LUTSpec:
    """How one layer is quantized: table bits, scale rank, rows per table (None: one per tensor), scale form.

    ``normalizer_grad`` (default False) lets the scale gradient also flow through the normalisation
    ``W / (A @ B)``; that term grows like 1/S² where a scale entry nears zero, and on SmolLM2 it made gradient
    norms explode and KD-QAT converge far slower (bench/README.md).
    """

    bits: int = 2
    rank: int = 32
    group_rows: int | None = None
    form: str = "v1"
    learnable_lut: bool = True
    ste_fp16: bool = False
    kmeans_weighting: str = "magnitude"
    normalizer_grad: bool = False

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"LUT bits must be 1..8, got {self.bits}")
        if self.rank < 1:
            raise ValueError(f"scale rank must be >= 1, got {self.rank}")
        if self.group_rows is not None and self.group_rows < 1:
            raise ValueError(f"group_rows must be >= 1 or null, got {self.group_rows}")
        if self.form not in FORMS:
            raise ValueError(f"form {self.form!r} is not one of {', '.join(FORMS)}")
        if self.kmeans_weighting not in WEIGHTINGS:
            raise ValueError(f"kmeans_weighting {self.kmeans_weighting!r} is not one of {', '.join(WEIGHTINGS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> LUTSpec:
        """A spec from stored settings (a checkpoint's record): unknown keys or wrong types raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"LUT settings must be a mapping, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(map(str, set(d) - set(known)))
        if unknown:
            raise ValueError(f"unknown LUT setting(s) {', '.join(unknown)} (known: {', '.join(known)})")
        for k, v in d.items():
            want = _SETTING_TYPES[k]
            if not isinstance(v, want) or (isinstance(v, bool) and want is not bool):
                names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
                raise ValueError(f"LUT setting {k!r} must be {names.replace('NoneType', 'null')}, got {v!r}")
        return cls(**d)


class LUTLinear(nn.Module):
    """Linear layer with LUT-quantized weight and low-rank scales (V1: A, B; V2: A_dir, B_dir, magnitude)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LUTSpec, latent: bool = True):
        """``latent=False``: no latent weight (a layer about to load frozen indices, see ``release_weight``)."""
        super().__init__()
        rows = spec.group_rows or out_features
        if out_features % rows:
            raise ValueError(f"group_rows {rows} does not divide the {out_features} output channels")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.forward_mode = "materialize"
        self.weight = nn.Parameter(torch.zeros((out_features, in_features) if latent else (0,)), latent)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        groups = out_features // rows
        self.lut = nn.Parameter(torch.zeros(groups, 2**spec.bits), requires_grad=spec.learnable_lut)
        self._make_scales(torch.zeros(out_features, spec.rank), torch.zeros(spec.rank, in_features), spec.form)
        self.register_buffer("index", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LUTSpec) -> LUTLinear:
        """Quantize a float Linear: rank-1 |W| scales, k-means table on W / scales, nearest indices."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, spec)
        m.to(linear.weight.device)
        with torch.no_grad():
            m.weight.copy_(linear.weight)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
            a, b = init_scales(linear.weight, spec.rank)
            m._make_scales(a, b, "v1")
            unit = m._grouped(m.weight / (a @ b))
            weights = m._grouped(linear.weight.abs()) if spec.kmeans_weighting == "magnitude" else None
            m.lut.copy_(kmeans_lut(unit, 2**spec.bits, weights=weights))
            m.index.copy_(m._ungroup(nearest_index(unit, m.lut)).to(torch.uint8))
        if spec.form == "v2":
            m.to_v2()
        return m

    def _make_scales(self, a: torch.Tensor, b: torch.Tensor, form: str) -> None:
        for name in SCALE_NAMES:
            self._parameters.pop(name, None)
        if form == "v1":
            self.scale_a, self.scale_b = nn.Parameter(a), nn.Parameter(b)
        else:
            a_dir, b_dir, g = v1_to_v2(a, b)
            self.a_dir, self.b_dir, self.magnitude = nn.Parameter(a_dir), nn.Parameter(b_dir), nn.Parameter(g)
        self.spec = LUTSpec(**{**self.spec.to_dict(), "form": form, "rank": a.shape[1]})

    def scale_params(self) -> dict[str, nn.Parameter]:
        """The scale parameters of this layer's form, by name (V1: scale_a, scale_b; V2: a_dir, b_dir, magnitude)."""
        return {n: self._parameters[n] for n in SCALE_NAMES if n in self._parameters}

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.lut.shape[0], -1)

    def _ungroup(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.out_features, self.in_features)

    # ---- the forward pass -------------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) scale factors in use (FP16-rounded with a straight-through gradient if ste_fp16)."""
        if self.spec.form == "v1":
            a, b = self.scale_a, self.scale_b
        else:
            a, b = v2_factors(self.a_dir, self.b_dir, self.magnitude)
        return (ste_fp16(a), ste_fp16(b)) if self.spec.ste_fp16 else (a, b)

    def table(self) -> torch.Tensor:
        return ste_fp16(self.lut) if self.spec.ste_fp16 else self.lut

    def codes(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        """Q = lut[index] (out × in); before freeze_q the index is the nearest entry to W / (A @ B), with STE."""
        lut = self.table()
        if bool(self.frozen):
            return self._ungroup(lut.gather(1, self._grouped(self.index).long()))
        if a is None:
            a, b = self.factors()
        scale = a @ b if self.spec.normalizer_grad else (a @ b).detach()
        return self._ungroup(lut_fake_quantize(self._grouped(self.weight / scale), lut))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        if self.forward_mode == "materialize" and not self.spec.normalizer_grad:  # saves 1 byte per weight
            index = self.index if bool(self.frozen) else None
            return lut_linear(x, self.weight, self.table(), a, b, self.bias, index)
        return lowrank_linear(x, self.codes(a, b), a, b, self.bias, self.forward_mode)

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with: Q ⊙ (A @ B)."""
        a, b = self.factors()
        return self.codes(a, b) * (a @ b)

    def current_index(self) -> torch.Tensor:
        """The indices in use now (the frozen buffer, or the nearest entries to the latent weight)."""
        if bool(self.frozen):
            return self.index
        with torch.no_grad():
            a, b = self.factors()
            return self._ungroup(nearest_index(self._grouped(self.weight / (a @ b)), self.table())).to(torch.uint8)

    @property
    def has_latent(self) -> bool:
        """Whether the layer still holds its float latent weight (released once the indices are frozen)."""
        return self.weight.numel() > 0

    @property
    def num_weights(self) -> int:
        """Weights this layer stands for (out × in), with or without its latent weight."""
        return self.out_features * self.in_features

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain Linear holding the dequantized weight: the same outputs, at float speed (for inference)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device)
        lin.weight.copy_(self.dequantized_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    # ---- conversions ---------------------------------------------------------------------------------
    @torch.no_grad()
    def freeze_q(self) -> None:
        """Fix the indices (``freeze_Q``): from now on only scales (and a learnable table) train."""
        self.index.copy_(self.current_index())
        self.frozen.fill_(True)
        self.release_weight()

    def release_weight(self) -> None:
        """Drop the latent weight of a frozen layer: nothing reads it any more (the indices stand for it)."""
        if not bool(self.frozen):
            raise ValueError("only a layer with frozen indices can release its latent weight (freeze_q first)")
        self.weight = nn.Parameter(self.weight.new_zeros(0), requires_grad=False)

    @torch.no_grad()
    def to_v2(self) -> None:
        """V1 -> V2: unit-norm directions and per-rank magnitudes with the same A @ B."""
        if self.spec.form == "v2":
            return
        self._make_scales(self.scale_a.detach().clone(), self.scale_b.detach().clone(), "v2")

    @torch.no_grad()
    def expand_rank(self, rank: int, generator: torch.Generator | None = None) -> None:
        """Grow the scale rank, keeping the layer's function (new ranks start at zero)."""
        if self.spec.form == "v1":
            a, b = expand_rank(self.scale_a.detach(), self.scale_b.detach(), rank, generator)
            self._make_scales(a, b, "v1")
            return
        old = self.spec.rank
        if rank < old:
            raise ValueError(f"cannot expand rank {old} to a smaller rank {rank}")
        new_a = torch.nn.functional.normalize(torch.randn(self.out_features, rank - old, generator=generator), dim=0)
        new_b = torch.nn.functional.normalize(torch.randn(rank - old, self.in_features, generator=generator), dim=1)
        dev = self.a_dir.device
        self.a_dir = nn.Parameter(torch.cat([self.a_dir.detach(), new_a.to(dev)], 1))
        self.b_dir = nn.Parameter(torch.cat([self.b_dir.detach(), new_b.to(dev)], 0))
        self.magnitude = nn.Parameter(torch.cat([self.magnitude.detach(), self.magnitude.new_zeros(rank - old)]))
        self.spec = LUTSpec(**{**self.spec.to_dict(), "rank": rank})

    @torch.no_grad()
    def reduce_bits(self, bits: int) -> None:
        """Fewer table entries (Q4 -> Q2): k-means over the old entries weighted by use, indices remapped."""
        if bits >= self.spec.bits:
            raise ValueError(f"reduce_bits needs fewer bits than {self.spec.bits}, got {bits}")
        index = self._grouped(self.current_index()).long()
        counts = torch.zeros_like(self.lut).scatter_add_(1, index, torch.ones_like(index, dtype=self.lut.dtype))
        new, mapping = reduce_lut(self.lut.detach(), counts, 2**bits)
        self.lut = nn.Parameter(new, requires_grad=self.spec.learnable_lut)
        self.index.copy_(self._ungroup(mapping.gather(1, index)).to(torch.uint8))
        self.spec = LUTSpec(**{**self.spec.to_dict(), "bits": bits})

    @torch.no_grad()
    def snap_fp16(self) -> None:
        """Round the table and scale parameters to FP16-representable values (what the device stores)."""
        for p in [self.lut, *self.scale_params().values()]:
            p.copy_(p.to(torch.float16).float())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Takes a state with or without the latent weight (full, or empty for frozen indices); a frozen layer
        releases its latent weight after loading, an unfrozen one whose weight was released gets it back. Either
        swaps the ``weight`` Parameter: load before an optimizer is built over it."""
        w, frozen = state_dict.get(prefix + "weight"), state_dict.get(prefix + "frozen")
        released = frozen is not None and frozen.numel() == 1 and bool(frozen)  # only frozen indices may lack it
        shapes = [(self.out_features, self.in_features)] + [(0,)] * released
        if w is not None and tuple(w.shape) in shapes and w.shape != self.weight.shape:
            self.weight = nn.Parameter(self.weight.new_zeros(w.shape), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if bool(self.frozen) and self.has_latent:
            self.release_weight()
        self.weight.requires_grad_(not bool(self.frozen))  # a frozen layer's latent weight no longer trains

    def set_forward_mode(self, mode: str) -> None:
        if mode not in FORWARD_MODES:
            raise ValueError(f"forward mode {mode!r} is not one of {', '.join(FORWARD_MODES)}")
        self.forward_mode = mode

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{self.in_features} -> {self.out_features}, {s.bits}-bit LUT x{self.lut.shape[0]}, rank {s.rank} "
                f"{s.form}, frozen={bool(self.frozen)}")  # fmt: skip
