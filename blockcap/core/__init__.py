"""The bottom layer: what a capture is (spec, sites, model sizes, storage encodings), errors,
and the store layout contract. Imports nothing else of blockcap.
"""
