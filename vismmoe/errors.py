"""Errors a user can act on. Each message names the problem and the fix."""


class VismmoeError(Exception):
    """Base class of every error vismmoe raises on purpose."""


class ModelLoadError(VismmoeError, OSError):
    """The model directory cannot be used: missing, incomplete, corrupt, or not a supported VL-MoE."""


class ConfigError(VismmoeError, ValueError):
    """A configuration value or key is invalid."""


class BudgetError(ConfigError):
    """The expert budget cannot be parsed or is too small to run the model."""


class InputError(VismmoeError, ValueError):
    """A request input (image, prompt, generation argument) is invalid."""


class EngineClosedError(VismmoeError, RuntimeError):
    """The engine was closed; load a new one."""
