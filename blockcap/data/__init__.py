"""Inputs and tokens: datasets, tokenizers, the split and the windows.
Imports only blockcap.core.
"""
