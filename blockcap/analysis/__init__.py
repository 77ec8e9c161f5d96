"""Reading stores back: the lazy reader, search, loader, interop, plots, describe, verify.
Imports blockcap.core, blockcap.data, blockcap.capture and blockcap.storage; never blockcap.run.
"""
