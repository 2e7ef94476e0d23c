"""Fixtures for tests and benchmarks, not part of the engine: nothing in vismmoe's serving path imports it.

`tiny_models` builds random checkpoints of the supported VL-MoE families offline (tests, eval/ GPU
benchmarks at full expert size, and the training recipes in models/ use it at run time, which is why it
ships inside the package).
"""
