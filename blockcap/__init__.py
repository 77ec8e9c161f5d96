"""blockcap."""
