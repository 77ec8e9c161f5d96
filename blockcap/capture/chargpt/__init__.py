"""The bundled character-level GPT of the original experiment: model, checkpoints, training,
and its capture module. Imports blockcap.core, blockcap.data and blockcap.capture's base.
"""
