"""The sites a capture can return: one vocabulary shared by the model side and the store.

A site is a tensor inside a transformer block, named the same way for every model family so
analysis code does not change between models. Vector sites are (position, width) per window;
``attention`` is the softmax pattern (head, query, key). Widths depend on the model: the residual
sites have the model width, ``heads_output`` is n_heads * head_dim, ``mlp_hidden`` the MLP width.
"""

from __future__ import annotations

RESIDUAL, HEADS, MLP = "model", "heads", "mlp"

# name -> which model dimension is its width
VECTOR_SITES: dict[str, str] = {
    "block_input": RESIDUAL,
    "heads_output": HEADS,
    "proj_output": RESIDUAL,
    "resid_mid": RESIDUAL,
    "mlp_hidden": MLP,
    "ffwd_output": RESIDUAL,
    "block_output": RESIDUAL,
}
# the name of a vector site's last dimension in the store, by width kind: sites of different widths
# in one group must not share a dimension name (xarray would refuse the group)
WIDTH_DIM: dict[str, str] = {RESIDUAL: "embed", HEADS: "head_features", MLP: "mlp"}
ATTENTION = "attention"
SITES: tuple[str, ...] = (*VECTOR_SITES, ATTENTION)
DEFAULT_SITES: tuple[str, ...] = ("heads_output", "proj_output", "ffwd_output")

# The TransformerLens name of each site, for readers who think in those.
TRANSFORMER_LENS: dict[str, str] = {
    "block_input": "blocks.{b}.hook_resid_pre",
    "heads_output": "blocks.{b}.attn.hook_z",
    "proj_output": "blocks.{b}.hook_attn_out",
    "resid_mid": "blocks.{b}.hook_resid_mid",
    "mlp_hidden": "blocks.{b}.mlp.hook_post",
    "ffwd_output": "blocks.{b}.hook_mlp_out",
    "block_output": "blocks.{b}.hook_resid_post",
    "attention": "blocks.{b}.attn.hook_pattern",
}


def is_vector(site: str) -> bool:
    return site in VECTOR_SITES
