"""Command line: `vismmoe run`, plus the subcommands other parts of the package register."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO_ROOT / "models" / "easyvqa-qwen3vlmoe"
DEMO_QUESTION = "what shape is in the image?"


def _demo_inputs(args) -> tuple[Path, str | None, str]:
    """The bundled demo model and image, or (until one is bundled) a tiny random model built now."""
    if args.model:
        return Path(args.model), args.image, args.prompt or DEMO_QUESTION
    if (DEMO_MODEL / "config.json").is_file():
        if args.image:
            return DEMO_MODEL, args.image, args.prompt or DEMO_QUESTION
        image, question = _first_example(DEMO_MODEL)
        return DEMO_MODEL, image, args.prompt or question
    from .tiny_models import build_checkpoint

    print("NOTE: no trained demo model is bundled in models/easyvqa-qwen3vlmoe; building a tiny RANDOM "
          "Qwen3-VL-MoE model on the fly instead. Its answers are noise; the stats are real.")
    target = Path(tempfile.gettempdir()) / "vismmoe-tiny-demo"
    if not (target / "config.json").is_file():
        build_checkpoint("qwen3_vl_moe", target, init_std=0.2)
    image = args.image
    if image is None:
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse((12, 12, 52, 52), fill="red")
        image = str(target / "demo.png")
        img.save(image)
    return target, image, args.prompt or DEMO_QUESTION


def _first_example(model_dir: Path) -> tuple[str, str]:
    """The bundled example image and its question (examples/questions.json)."""
    import json

    questions = json.loads((model_dir / "examples" / "questions.json").read_text())
    name = sorted(questions)[0]
    return str(model_dir / "examples" / name), questions[name]["question"]


def cmd_run(args) -> int:
    import vismmoe

    model, image, prompt = _demo_inputs(args)
    overrides = {"expert_budget": args.budget, "device": args.device, "max_new_tokens": args.max_new_tokens,
                 "visual_keep": args.keep, "visual_prune": args.prune, "visual_merge": args.merge}
    try:
        engine = vismmoe.load(model, config=args.config, **overrides)
        result = engine.generate(image=image, prompt=prompt)
    except vismmoe.VismmoeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model:    {model}")
    print(f"image:    {image}")
    print(f"question: {prompt}")
    print(f"answer:   {result.text}")
    print()
    print(result.stats.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vismmoe", description="VL-MoE inference with offloaded experts")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one question about one image")
    run.add_argument("--model", help="checkpoint directory (default: the bundled demo model)")
    run.add_argument("--image", help="image file (default: a bundled example image)")
    run.add_argument("--prompt", help=f"the question (default: {DEMO_QUESTION!r})")
    run.add_argument("--config", help="YAML engine config or deployment profile")
    run.add_argument("--budget", help="GPU expert budget: '12GiB', '800MB', 0.25, '25%%' or 'min'")
    run.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
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


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    if getattr(args, "budget", None) is not None:
        args.budget = _number_or_text(args.budget)
    return args.func(args)


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


def _number_or_text(value: str):
    try:
        number = float(value)
    except ValueError:
        return value
    return number if number <= 1 else int(number)


if __name__ == "__main__":
    sys.exit(main())
