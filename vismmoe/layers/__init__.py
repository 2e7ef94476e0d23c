"""Model layers that vismmoe runs in its own kernels in place of transformers' modules (rms_norm.py)."""
