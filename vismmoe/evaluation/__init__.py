"""VQA evaluation harness: benchmark loaders, official metrics, the eval loop and `score` for predictions."""

from .cli import register_cli
from .errors import EvalDataError
from .runner import run_eval
from .scoring import score
from .tasks import TASKS, get_task

__all__ = ["run_eval", "score", "register_cli", "EvalDataError", "TASKS", "get_task"]
