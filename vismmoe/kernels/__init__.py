"""Hand-written GPU kernels (Triton), each called through one op in vismmoe/ops.py beside its torch twin."""
