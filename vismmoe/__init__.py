"""vismmoe: vision-language Mixture-of-Experts inference on GPUs too small to hold the model."""

from .config import EngineConfig, load_config
from .engine import Engine, Result, load
from .errors import BudgetError, ConfigError, EngineClosedError, InputError, ModelLoadError, VismmoeError

__version__ = "0.1.0"
__all__ = [
    "Engine", "EngineConfig", "Result", "load", "load_config",
    "VismmoeError", "ModelLoadError", "ConfigError", "BudgetError", "InputError", "EngineClosedError",
]
