"""The one name of a routed expert, and the one place MoE layer indices meet model layer numbers.

    ExpertKey(layer, expert)   layer is the MoE layer index 0..L-1 (the j-th MoE layer of the model),
                               never the model's layer number; expert is the index within that layer.
                               A tuple, so `array[key]` reads row `layer`, column `expert` of any [L, E]
                               array (predictions, residency masks) without translation.
    ExpertSpace                which model layers are MoE layers, and how many experts each has:
                               `model_layer(j)` and `index(model_layer)` are the only translations.

Everything that names an expert (planner, cache, store, predictor, simulator, traces) uses ExpertKey;
only the loader (checkpoint tensor names) and the model (its blocks' numbers) see model layer numbers.

Not for: where an expert's bytes live (store.py, layout.py) or which slot holds it (residency.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class ExpertKey(NamedTuple):
    layer: int  # MoE layer index, 0..L-1
    expert: int


@dataclass(frozen=True)
class ExpertSpace:
    """L = len(model_layers) MoE layers of `n_experts` routed experts each, `top_k` routed per token."""

    model_layers: tuple[int, ...]  # model layer number of MoE layer j, increasing
    n_experts: int
    top_k: int = 1
    _index: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.model_layers:
            raise ValueError("an expert space needs at least one MoE layer")
        if list(self.model_layers) != sorted(set(self.model_layers)):
            raise ValueError(f"MoE layer numbers must increase: {self.model_layers}")
        if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"{self.n_experts} experts with top-{self.top_k} routing is not a valid MoE layer")
        object.__setattr__(self, "_index", {m: j for j, m in enumerate(self.model_layers)})

    @classmethod
    def of(cls, model_layers: Sequence[int], n_experts: int, top_k: int = 1) -> ExpertSpace:
        return cls(tuple(int(m) for m in model_layers), int(n_experts), int(top_k))

    @property
    def n_layers(self) -> int:
        return len(self.model_layers)

    @property
    def shape(self) -> tuple[int, int]:
        """(L, E): the shape of every per-key array."""
        return self.n_layers, self.n_experts

    def model_layer(self, index: int) -> int:
        return self.model_layers[index]

    def index(self, model_layer: int) -> int:
        try:
            return self._index[model_layer]
        except KeyError:
            raise KeyError(f"model layer {model_layer} is not a MoE layer (MoE layers: {self.model_layers})") from None

    def keys(self) -> list[ExpertKey]:
        return [ExpertKey(j, e) for j in range(self.n_layers) for e in range(self.n_experts)]
