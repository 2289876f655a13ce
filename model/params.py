"""Parameters as plain tensors: a dict of named tensors, and its flat form.

The learner updates one flat vector (one controller call covers every element); the
recommender reads named views of it. `ParamLayout` converts between the two.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

Params = dict[str, Tensor]


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params: Params) -> "ParamLayout":
        return cls(tuple(params), tuple(tuple(p.shape) for p in params.values()))

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(shape).numel()) for shape in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, params: Params) -> Tensor:
        return torch.cat([params[name].reshape(-1) for name in self.names])

    def unflatten(self, flat: Tensor) -> Params:
        """Named views of `flat` [numel] (no copy)."""
        parts = torch.split(flat, self.sizes)
        return {
            name: part.view(shape)
            for name, part, shape in zip(self.names, parts, self.shapes, strict=True)
        }
