"""Hugging Face models: loading (``load``, ``checks``, ``hub``) and the families' capture modules.

Named families: ``gpt2``, ``neox``, ``llama`` (Llama, Mistral, Qwen2, Qwen3, Phi-3), ``gemma``
(Gemma 2, Gemma 3), ``olmo2``, ``moe`` (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE); the rotary ones
share ``decoder``. Any other decoder: ``generic`` (block inputs and outputs). Imports
blockcap.core, blockcap.data and blockcap.capture's base.
"""
