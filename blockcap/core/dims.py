"""A model's sizes, as far as a store's layout needs them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from blockcap.core.sites import HEADS, MLP, VECTOR_SITES


@dataclass(frozen=True)
class ModelDims:
    """The sizes a store's layout needs."""

    n_layer: int
    d_model: int
    n_head: int  # query heads
    head_dim: int
    d_mlp: int
    vocab_size: int  # rows of the embedding table
    context: int  # longest sequence the model takes

    def width(self, site: str) -> int:
        """Last-axis size of a vector site."""
        kind = VECTOR_SITES[site]
        return {HEADS: self.n_head * self.head_dim, MLP: self.d_mlp}.get(kind, self.d_model)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
