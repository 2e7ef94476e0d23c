"""Command line: `vismmoe run`, plus the subcommands other parts of the package register."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_ENV = "VISMMOE_DEMO_MODEL"
DEMO_QUESTION = "what shape is in the image?"


def demo_model() -> Path:
    """The bundled demo model: $VISMMOE_DEMO_MODEL if set, else models/easyvqa-qwen3vlmoe of the source
    checkout this package runs from (a wheel does not carry the 20 MB model)."""
    from .errors import ModelLoadError

    configured = os.environ.get(DEMO_ENV)
    path = Path(configured) if configured else REPO_ROOT / "models" / "easyvqa-qwen3vlmoe"
    if (path / "config.json").is_file():
        return path
    where = f"{DEMO_ENV}={configured!r} is not a checkpoint directory" if configured else f"{path} does not exist"
    raise ModelLoadError(
        f"no demo model: {where}. Pass --model DIR, or set {DEMO_ENV} to the models/easyvqa-qwen3vlmoe directory "
        "of the vismmoe source repository"
    )


def _demo_inputs(args) -> tuple[Path, str | None, str]:
    """The model, image and question of `vismmoe run`; without --model the bundled demo and its example."""
    if args.model:
        return Path(args.model), args.image, args.prompt if args.prompt is not None else DEMO_QUESTION
    model = demo_model()
    if args.image:
        return model, args.image, args.prompt if args.prompt is not None else DEMO_QUESTION
    image, question = _first_example(model)
    return model, image, args.prompt if args.prompt is not None else question


def _first_example(model_dir: Path) -> tuple[str, str]:
    """The bundled example image and its question (examples/questions.json)."""
    import json

    questions = json.loads((model_dir / "examples" / "questions.json").read_text())
    name = sorted(questions)[0]
    return str(model_dir / "examples" / name), questions[name]["question"]


def cmd_run(args) -> int:
    import vismmoe

    model, image, prompt = _demo_inputs(args)
    # The budget text goes to the engine as written: one grammar (config.parse_budget) for CLI, YAML and API.
    overrides = {"expert_budget": args.budget, "device": args.device, "max_new_tokens": args.max_new_tokens,
                 "visual_keep": args.keep, "visual_prune": args.prune, "visual_merge": args.merge,
                 "emulate": args.emulate}
    engine = vismmoe.load(model, config=args.config, **overrides)
    result = engine.generate(image=image, prompt=prompt)
    print(f"model:    {model}")
    print(f"image:    {image}")
    print(f"question: {prompt}")
    print(f"answer:   {result.text}")
    print()
    print(result.stats.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="vismmoe", description="VL-MoE inference with offloaded experts")
    parser.add_argument("--version", action="version", version=f"vismmoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one question about one image")
    run.add_argument("--model", help="checkpoint directory (default: the bundled demo model)")
    run.add_argument("--image", help="image file (default: a bundled example image)")
    run.add_argument("--prompt", help=f"the question (default: {DEMO_QUESTION!r})")
    run.add_argument("--config", help="YAML engine config or deployment profile")
    run.add_argument("--budget", help="GPU expert budget: a size ('12GiB', '800MB'), a fraction in (0, 1] (0.25, "
                                      "'25%%'), an integer byte count, or 'min'")
    run.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--emulate", metavar="PROFILE", help="emulate a device profile (`vismmoe devices`): its usable "
                     "memory caps the engine and expert copies are paced to its host link; compute stays this GPU's")
    run.add_argument("--max-new-tokens", type=positive_int, dest="max_new_tokens")
    run.add_argument("--keep", type=_keep_value,
                     help="visual tokens to keep: a ratio in (0, 1] such as 0.25 (1.0 = no pruning) or a count such as 64")
    run.add_argument("--prune", help="pruning method: affinity (default), diversity, importance, pool or random")
    run.add_argument("--merge", action="store_true", default=None,
                     help="merge each pruned visual token into its most similar kept token instead of dropping it")
    run.set_defaults(func=cmd_run)
    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    # Subcommands that live with their feature (evaluation, benchmarks) register themselves.
    for module in ("vismmoe.evaluation.cli", "vismmoe.deploy.cli", "vismmoe.pruning.cli"):
        try:
            mod = __import__(module, fromlist=["register_cli"])
        except ImportError:
            continue
        mod.register_cli(sub)


def positive_int(text: str) -> int:
    """argparse type: a positive integer (0 and negatives are refused, not read as 'all' or 'default')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def run_command(args) -> int:
    """The one error path of every subcommand: a VismmoeError is one line on stderr and exit 2; Ctrl-C
    says what was saved and exits 130; anything else is a bug and keeps its traceback."""
    from .errors import VismmoeError

    try:
        return args.func(args)
    except VismmoeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        saved, total = getattr(exc, "saved", None), getattr(exc, "total", None)
        if saved is not None:
            print(f"interrupted: {saved}/{total} saved; re-run to resume", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    _show_engine_notes()
    return run_command(args)


def _show_engine_notes() -> None:
    """The `vismmoe` logger's notes (a kernel's first-use build time) on stderr, once per message."""
    import logging

    log = logging.getLogger("vismmoe")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("vismmoe: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _keep_value(text: str):
    # An integer is a token count, anything with a point or exponent a ratio (validated by the config).
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep takes a ratio such as 0.25 or a token count such as 64, got {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
