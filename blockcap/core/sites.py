"""The sites a capture can return: one vocabulary shared by the model side and the store.

A site is a tensor inside a transformer block, named the same way for every model family so
analysis code does not change between models. Vector sites are (position, width) per window;
``attention`` is the softmax pattern (head, query, key). Widths depend on the model: the residual
sites have the model width, ``heads_output`` is n_heads * head_dim, ``mlp_hidden`` the MLP width,
``router_logits`` (mixture-of-experts blocks only) the number of experts.
"""

from __future__ import annotations

RESIDUAL, HEADS, MLP, EXPERTS = "model", "heads", "mlp", "experts"
ROUTER_LOGITS = "router_logits"

# name -> which model dimension is its width
VECTOR_SITES: dict[str, str] = {
    "block_input": RESIDUAL,
    "heads_output": HEADS,
    "proj_output": RESIDUAL,
    "resid_mid": RESIDUAL,
    "mlp_hidden": MLP,
    "ffwd_output": RESIDUAL,
    "block_output": RESIDUAL,
    ROUTER_LOGITS: EXPERTS,
}
# the name of a vector site's last dimension in the store, by width kind: sites of different widths
# in one group must not share a dimension name (xarray would refuse the group)
WIDTH_DIM: dict[str, str] = {RESIDUAL: "embed", HEADS: "head_features", MLP: "mlp", EXPERTS: "expert"}
ATTENTION = "attention"
SITES: tuple[str, ...] = (*VECTOR_SITES, ATTENTION)
# what sites=all means: every vector site a dense block has (router_logits, like attention, is opt-in)
ALL_SITES: tuple[str, ...] = tuple(s for s in VECTOR_SITES if s != ROUTER_LOGITS)
DENSE_SITES: tuple[str, ...] = (*ALL_SITES, ATTENTION)  # every site of a dense block
DEFAULT_SITES: tuple[str, ...] = ("heads_output", "proj_output", "ffwd_output")

# The TransformerLens name of each site that TransformerLens has, for readers who think in those
# (it has no hook on the router's logits).
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


# What each site is in each family's blocks, for ``info`` and readers of a store: the family a
# store's model record names (``meta["model"]["family"]``) -> site -> meaning.
_PRE_NORM = {
    "block_input": "the residual stream entering the block",
    "heads_output": "the attention heads' outputs, concatenated: the input of the out projection",
    "proj_output": "the attention out projection's output, what attention adds to the residual stream",
    "resid_mid": "the residual stream between attention and MLP (block input + proj_output)",
    "mlp_hidden": "the MLP's hidden activations: the input of its down projection",
    "ffwd_output": "the MLP's output, what it adds to the residual stream",
    "block_output": "the residual stream leaving the block (resid_mid + ffwd_output)",
    "attention": "the softmax attention pattern (head, query, key)",
}
_POST_NORM = {
    **_PRE_NORM,
    "proj_output": "what attention adds to the residual stream: the out projection's output after the "
    "post-attention norm",
    "ffwd_output": "what the MLP adds to the residual stream: its down projection's output after the "
    "post-feedforward norm",
}
_MOE = {
    **_PRE_NORM,
    "ffwd_output": "the whole sparse mixture-of-experts block's output (weighted experts, plus the gated "
    "shared expert where the model has one): what it adds to the residual stream",
    "mlp_hidden": "the MLP's hidden activations, in the dense (non-expert) blocks only",
    ROUTER_LOGITS: "the router's logits, one per expert, before its softmax and top-k choice",
}
SITE_MEANINGS: dict[str, dict[str, str]] = {
    "chargpt": _PRE_NORM,
    "gpt2": _PRE_NORM,
    "neox": {
        **_PRE_NORM,
        "block_output": "the residual stream leaving the block (with a parallel residual: block input + "
        "proj_output + ffwd_output)",
    },
    "llama": _PRE_NORM,
    "gemma": _POST_NORM,
    "olmo2": {
        **_POST_NORM,
        "heads_output": "the attention heads' outputs, concatenated (the block has no norm before "
        "attention: q, k, v read the block input)",
    },
    "moe": _MOE,
    "generic": {s: _PRE_NORM[s] for s in ("block_input", "block_output")},
}
