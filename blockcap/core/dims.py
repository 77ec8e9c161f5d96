"""A model's sizes, as far as a store's layout needs them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from blockcap.core.sites import EXPERTS, HEADS, MLP, VECTOR_SITES


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
    n_experts: int = 0  # experts per mixture-of-experts block; 0 for dense models (and older stores)

    def width(self, site: str) -> int:
        """Last-axis size of a vector site."""
        kind = VECTOR_SITES[site]
        return {HEADS: self.n_head * self.head_dim, MLP: self.d_mlp, EXPERTS: self.n_experts}.get(
            kind, self.d_model
        )

    def to_dict(self) -> dict[str, int]:
        """The sizes as a store records them; ``n_experts`` only for a mixture-of-experts model, so a
        dense model's record is what blockcap wrote before it knew experts."""
        d = asdict(self)
        if not self.n_experts:
            del d["n_experts"]
        return d
