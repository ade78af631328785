"""How one routed expert is laid out as a single flat buffer.

Every expert of a model has the same shape, so every buffer (host arena slot,
staging buffer, device cache slot) is interchangeable and moving an expert is one
contiguous copy. Layout of one buffer, D = hidden size, F = expert FFN size:

    [ gate (F*D) | up (F*D) | down (D*F) | padding to a 128-element boundary ]

`gate` and `up` are adjacent so the first matmul is one [2F, D] GEMM.

Not for: where the expert lives (tiers) or which slot holds it (residency).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ALIGN = 128  # elements; keeps every view equally aligned in every slot


@dataclass(frozen=True)
class ExpertTensorNames:
    """Checkpoint tensor names of one expert's three projections, each [out, in]."""

    gate: str  # [F, D]
    up: str  # [F, D]
    down: str  # [D, F]


@dataclass(frozen=True)
class ExpertLayout:
    hidden: int  # D
    ffn: int  # F
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return 3 * self.hidden * self.ffn

    @property
    def padded_numel(self) -> int:
        return -(-self.numel // _ALIGN) * _ALIGN

    @property
    def nbytes(self) -> int:
        """Bytes moved per expert (payload, padding excluded)."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def slot_nbytes(self) -> int:
        return self.padded_numel * torch.empty((), dtype=self.dtype).element_size()

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2F, D], down [D, F]) views into one flat expert buffer."""
        fd = self.ffn * self.hidden
        gate_up = flat[: 2 * fd].view(2 * self.ffn, self.hidden)
        down = flat[2 * fd : 3 * fd].view(self.hidden, self.ffn)
        return gate_up, down

    def pack(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, out: torch.Tensor) -> None:
        """Copy (and cast) the three checkpoint tensors into one flat buffer."""
        f, d = self.ffn, self.hidden
        for name, t, shape in (("gate", gate, (f, d)), ("up", up, (f, d)), ("down", down, (d, f))):
            if tuple(t.shape) != shape:
                raise ValueError(f"expert {name} projection has shape {tuple(t.shape)}, expected {shape}")
        gate_up, down_view = self.views(out)
        gate_up[:f].copy_(gate)
        gate_up[f:].copy_(up)
        down_view.copy_(down)
