"""Any other causal LM: what enters and leaves each block, through the model's own layers.

Where blockcap has no capture module for a ``model_type``, it can still run the model's decoder
layers one by one and return each one's input and output (``block_input``, ``block_output``):
every other site needs the block's internals and is refused. The capture module does what the
model's forward does before its layers (embeddings, positions, mask), which differs by layout:

* ``DecoderLayout``: ``embed_tokens``, optional ``rotary_emb`` and ``layers`` (most models written
  for transformers 4.48 and later: OLMo, Granite-like, StableLM, ...), masks by ``layer_types``;
* ``OPTLayout``: OPT's learned positions (offset 2) and optional input projection;
* ``BloomLayout``: BLOOM's embedding norm and ALiBi.

A model that fits none of them is refused. As a model's forward may do more than its layout
says (an embedding multiplier, say), ``verify`` runs the model itself once and the capture once
on a probe, and the load is refused unless every block input matches bit for bit.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from blockcap.capture.base import CaptureModule
from blockcap.capture.hf.adapter import HFAdapter
from blockcap.capture.hf.attention import additive_mask, causal_allowed
from blockcap.capture.hf.parts import Decoder
from blockcap.core.dims import ModelDims
from blockcap.core.errors import BlockcapError
from blockcap.core.sites import SITES

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.models.bloom.modeling_bloom import BloomModel
    from transformers.models.opt.modeling_opt import OPTModel

CAPTURED = ("block_input", "block_output")
PROBE_TOKENS = 40  # crosses any sliding window shorter than it
NO_POSITION_LIMIT = 2**31 - 1  # ALiBi models have no table of positions
LAYER_TYPES = ("full_attention", "sliding_attention")


class GenericCapture(CaptureModule):
    """The model's own layers ``0..max(blocks)``, after its ``prelude``."""

    def __init__(
        self, model: PreTrainedModel, blocks: Sequence[int], sites: Sequence[str], fused: bool = False
    ):
        super().__init__(blocks, sites)
        self.layers = nn.ModuleList(layer_list(model)[: self.depth])
        self.eval()

    def prelude(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The first layer's input and each layer's keyword arguments, as the model's forward makes them."""
        raise NotImplementedError

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, kwargs = self.prelude(ids)
        captured: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            out = layer(x, **kwargs[i])
            out = out[0] if isinstance(out, tuple) else out
            captured += self.pick(i, block_input=x, block_output=out)
            x = out
        return tuple(captured)


class DecoderLayout(GenericCapture):
    """``embed_tokens``, optional ``rotary_emb``, ``layers`` called with mask, positions and rotary tables."""

    def __init__(
        self, model: PreTrainedModel, blocks: Sequence[int], sites: Sequence[str], fused: bool = False
    ):
        super().__init__(model, blocks, sites)
        self.embed_tokens = cast("Decoder", model).embed_tokens
        self.rotary_emb = getattr(model, "rotary_emb", None)
        cfg = model.config
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(self.layers)
        self.windows = tuple(
            cfg.sliding_window if t == "sliding_attention" else None for t in types[: self.depth]
        )

    def prelude(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        B, T = ids.shape
        x = self.embed_tokens(ids)
        positions = torch.arange(T, device=ids.device).unsqueeze(0)
        masks = {  # (B, 1, T, T) as transformers' eager masks are: some layers check the shape
            w: additive_mask(causal_allowed(T, w, ids.device), x.dtype).expand(B, 1, T, T)
            for w in dict.fromkeys(self.windows)
        }
        common: dict[str, Any] = {"position_ids": positions}
        if self.rotary_emb is not None:
            common["position_embeddings"] = self.rotary_emb(x, positions)
        return x, [{"attention_mask": masks[w], **common} for w in self.windows]


class OPTLayout(GenericCapture):
    """OPT: token embeddings (projected in where the model has ``project_in``) plus learned positions."""

    def __init__(
        self, model: PreTrainedModel, blocks: Sequence[int], sites: Sequence[str], fused: bool = False
    ):
        super().__init__(model, blocks, sites)
        decoder = cast("OPTModel", model).decoder
        self.embed_tokens, self.embed_positions = decoder.embed_tokens, decoder.embed_positions
        self.project_in = decoder.project_in

    def prelude(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        B, T = ids.shape
        x = self.embed_tokens(ids)
        ones = torch.ones(B, T, device=ids.device)  # OPTDecoder.forward's positions without padding
        positions = (torch.cumsum(ones, dim=1) * ones - 1).long()
        pos_embeds = self.embed_positions(ones, 0, position_ids=positions)
        if self.project_in is not None:
            x = self.project_in(x)
        mask = additive_mask(causal_allowed(T, None, ids.device), x.dtype)
        return x + pos_embeds, [{"attention_mask": mask, "position_ids": positions}] * len(self.layers)


class BloomLayout(GenericCapture):
    """BLOOM: embeddings normed by ``word_embeddings_layernorm``, ALiBi biases, a causal mask."""

    def __init__(
        self, model: PreTrainedModel, blocks: Sequence[int], sites: Sequence[str], fused: bool = False
    ):
        super().__init__(model, blocks, sites)
        bloom = cast("BloomModel", model)
        self.word_embeddings, self.word_embeddings_layernorm = (
            bloom.word_embeddings,
            bloom.word_embeddings_layernorm,
        )
        self.alibi_slopes = sys.modules[type(model).__module__]._get_alibi_slopes
        self.num_heads = bloom.num_heads

    def prelude(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        B, T = ids.shape
        x = self.word_embeddings_layernorm(self.word_embeddings(ids))
        slopes = self.alibi_slopes(self.num_heads, x.device)  # as BloomModel.forward without a padding mask
        alibi = (slopes[:, None, None] * torch.arange(T, device=x.device)).repeat(B, 1, 1).to(x.dtype)
        mask = additive_mask(causal_allowed(T, None, ids.device), x.dtype)
        return x, [{"alibi": alibi, "attention_mask": mask}] * len(self.layers)


def layer_list(model: PreTrainedModel) -> nn.ModuleList:
    cfg = model.config
    if cfg.model_type == "opt":
        return cast("OPTModel", model).decoder.layers
    return cast("BloomModel", model).h if cfg.model_type == "bloom" else cast("Decoder", model).layers


def vocab_size(model: PreTrainedModel) -> int:
    """The size of the model's input embedding table."""
    return cast(nn.Embedding, model.get_input_embeddings()).num_embeddings


def layout_of(model: PreTrainedModel) -> type[GenericCapture] | str:
    """The layout class that fits ``model``, or why none does."""
    cfg = model.config
    if cfg.model_type == "opt":
        return OPTLayout
    if cfg.model_type == "bloom":
        return BloomLayout
    layers = getattr(model, "layers", None)
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != n or not hasattr(model, "embed_tokens"):
        return "its decoder layers are not model.layers beside model.embed_tokens"
    types = getattr(cfg, "layer_types", None)
    if types is not None and not set(types) <= set(LAYER_TYPES):
        unknown = sorted(set(types) - set(LAYER_TYPES))[0]
        return f"its layer_types have {unknown!r}, an attention it does not know"
    if types is None and getattr(cfg, "sliding_window", None):
        return (
            f"its config sets sliding_window={cfg.sliding_window} but not which layers use it (layer_types)"
        )
    return DecoderLayout


def verify(model: PreTrainedModel, capture: type[GenericCapture]) -> str | None:
    """None when the capture's block inputs on a probe are bitwise the model's own ``hidden_states``;
    else what differs, or how running the layers failed."""
    n, vocab = len(layer_list(model)), vocab_size(model)
    T = min(PROBE_TOKENS, context_of(model.config))
    ids = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(0))
    module = capture(model, range(n), CAPTURED)
    with torch.inference_mode():
        hidden = model(ids, use_cache=False, output_hidden_states=True).hidden_states
        try:
            got = dict(zip(module.outputs, module(ids), strict=True))
        except Exception as e:  # noqa: BLE001 - layers that want other arguments fail in their own ways
            first = (str(e).strip().splitlines() or [""])[0]
            return f"its layers fail when called that way ({type(e).__name__}: {first})"
    for i in range(n):  # the last entry of hidden_states is after the final norm
        if not torch.equal(got[(i, "block_input")], hidden[i]):
            return (
                f"block {i}'s input differs from the model's own hidden_states (its forward does more "
                f"than its layers)"
            )
    return None


def context_of(cfg: Any) -> int:
    """The longest sequence the config allows (ALiBi models state none)."""
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return NO_POSITION_LIMIT


class Generic(HFAdapter):
    family = "generic"

    def __init__(self, model: PreTrainedModel, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        layout = layout_of(model)
        assert not isinstance(layout, str), layout  # load checks the layout first
        self.capture_class = layout

    @staticmethod
    def dims_of(model: PreTrainedModel) -> ModelDims:
        """What the generic path knows: layers, widths and vocabulary; heads as the config states
        them, and no MLP width (``d_mlp`` 0: it captures no MLP site)."""
        cfg = model.config
        n_head = getattr(cfg, "num_attention_heads", None) or 0
        head_dim = (getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head) if n_head else 0
        return ModelDims(
            n_layer=len(layer_list(model)), d_model=cfg.hidden_size, n_head=n_head, head_dim=head_dim,
            d_mlp=0, vocab_size=vocab_size(model), context=context_of(cfg),
        )  # fmt: skip

    def absent_sites(self, blocks: Sequence[int]) -> dict[str, str]:
        why = (
            f"blockcap has no capture module for {self.model.config.model_type!r} models, so it captures "
            f"what enters and leaves each block only"
        )
        return {site: why for site in SITES if site not in CAPTURED}

    def capture_module(self, blocks: Sequence[int], sites: Sequence[str], fused: bool) -> CaptureModule:
        if fused:
            raise BlockcapError(
                f"fused=True changes nothing on the generic path (the {self.model.config.model_type!r} "
                f"blocks run the model's own attention); drop fused"
            )
        return super().capture_module(blocks, sites, fused)
