"""Visual-token pruning between the vision tower and the language model (see pruner.py for the design)."""

from .pruner import SUPPORTED, PruneRecord, VisualPruner
from .settings import METHODS

__all__ = ["METHODS", "SUPPORTED", "PruneRecord", "VisualPruner"]
