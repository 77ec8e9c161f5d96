"""Hugging Face model families (GPT-2, GPT-NeoX, Llama family): loading and capture modules.
Imports blockcap.core, blockcap.data and blockcap.capture's base.
"""
