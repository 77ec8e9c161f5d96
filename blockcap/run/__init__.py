"""The job: planning, scheduling batches into units, distributed ranks, dry runs, devices.
Imports blockcap.core, blockcap.data, blockcap.capture and blockcap.storage.
"""
