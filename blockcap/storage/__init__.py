"""Where and how captured tensors are kept: locations, codecs, commit records, the writer,
statistics partials and the store's lifecycle. Imports only blockcap.core.
"""
