"""pytest-benchmark suite: blockcap against the bare forward pass and the original experiment."""
