"""`vismmoe eval` and `vismmoe score`: `register_cli(subparsers)` adds both to the main parser."""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import positive_int, run_command
from .tasks import TASKS

_TASK_HELP = "one of " + ", ".join(TASKS) + " (easyvqa and scenevqa need no --data)"


def register_cli(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="evaluate a model on a VQA benchmark",
                               description="Evaluate a model on a VQA benchmark read from local files. "
                                           "Re-running into the same --output resumes. For several GPUs: "
                                           "torchrun --nproc-per-node N -m vismmoe.evaluation eval ...")
    ev.add_argument("--model", required=True, help="model directory")
    _common(ev)
    ev.add_argument("--limit", type=positive_int, help="evaluate only the first N questions (N >= 1)")
    ev.add_argument("--config", help="engine config YAML")
    ev.add_argument("--emulate", metavar="PROFILE", help="emulate a device profile (`vismmoe devices`): memory cap "
                    "and paced expert copies (the `emulate` config key)")
    ev.add_argument("--sweep", nargs="+", metavar="KEY=V1,V2",
                    help="grid of engine config overrides, e.g. budget=0.25,0.5 visual_keep=1.0,0.5 visual_prune=affinity,random (one run per combination)")
    ev.add_argument("--max-new-tokens", type=positive_int, help="generation length (default: the task's)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--output", help="output directory (default runs/eval/<model>/<task>)")
    ev.set_defaults(func=_eval)

    sc = subparsers.add_parser("score", help="score existing predictions without a model",
                               description='Score a JSONL of {"question_id": ..., "prediction": "..."} lines.')
    _common(sc)
    sc.add_argument("--predictions", required=True, help="predictions JSONL")
    sc.add_argument("--output", required=True, help="output directory")
    sc.set_defaults(func=_score)


def _common(parser) -> None:
    parser.add_argument("--task", required=True, help=_TASK_HELP)
    parser.add_argument("--data", help="local dataset path (parquet / save_to_disk directory / VQAv2 JSON pair)")
    parser.add_argument("--split", help="split to use when the data holds several")
    parser.add_argument("--normalize", choices=("official", "always"), default="official",
                        help="VQAv2/GQA answer normalisation: as the official code (default) or always (lmms-eval)")
    parser.add_argument("--prompt-template", help="str.format template replacing the task's prompt, e.g. '{question}'")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip malformed records (counted in results.json) instead of stopping")


def _eval(args) -> int:
    from .runner import run_eval

    config = args.config
    if args.emulate:  # the config (file or defaults) with `emulate` set
        from ..config import load_config

        config = {**load_config(args.config).to_dict(), "emulate": args.emulate}
    results = run_eval(args.model, args.task, args.data, limit=args.limit, config=config, sweep=args.sweep,
                       output=args.output, split=args.split, normalize=args.normalize,
                       prompt_template=args.prompt_template, max_new_tokens=args.max_new_tokens,
                       skip_bad=args.skip_bad, progress=not args.no_progress)
    _print(results)
    return 0


def _score(args) -> int:
    from .scoring import score

    results = score(args.task, args.predictions, args.data, output=args.output, split=args.split,
                    normalize=args.normalize, skip_bad=args.skip_bad, prompt_template=args.prompt_template)
    missing = results["missing_predictions"]["count"]
    if missing:
        print(f"warning: {missing} questions have no prediction and are not scored", file=sys.stderr)
    _print(results)
    return 0


def _print(results: dict) -> None:
    if "rows" in results:  # a sweep
        for row in results["rows"]:
            print(json.dumps(row, default=str))
        return
    print(f"{results['task']}: {results['headline']['name']} = {results['headline']['value']} "
          f"over {results['n_samples']} samples (skipped {results['skipped']['count']})")


def main(argv=None) -> int:
    """Stand-alone entry point (`python -m vismmoe.evaluation`), e.g. under torchrun."""
    parser = argparse.ArgumentParser(prog="python -m vismmoe.evaluation")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args)  # the same error path as `vismmoe eval`
