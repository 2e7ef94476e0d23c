"""`vismmoe affinity`: the routing-statistics report of vismmoe/pruning/analysis.py, as a command."""

from __future__ import annotations

import sys
from pathlib import Path


def _list(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            import argparse

            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def _keep(text: str):
    return int(text) if text.strip().isdigit() else float(text)


def register_cli(sub) -> None:
    p = sub.add_parser("affinity", help="how visual-token pruning reshapes expert demand (routing statistics)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--task", required=True, help="evaluation task, e.g. easyvqa")
    p.add_argument("--data", help="the task's local files (tasks that need them)")
    p.add_argument("--split", help="dataset split (default: the task's)")
    p.add_argument("--keep", type=_list(_keep), default=[1.0, 0.5, 0.25], help="visual_keep values, e.g. 1,0.5,0.25")
    p.add_argument("--prune", type=_list(str), default=["affinity", "diversity", "random"],
                   help="methods, e.g. affinity,diversity,random")
    p.add_argument("--limit", type=int, default=32, help="first N questions (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=16, dest="max_new_tokens")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--affinity-weights", dest="affinity_weights", type=_weights, default=None,
                   help='the affinity method\'s score weights as JSON, e.g. \'{"concentration": 4}\' (others default)')
    p.add_argument("--output", required=True, help="output directory")
    p.set_defaults(func=cmd_affinity)


def _weights(text: str) -> dict:
    import argparse
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--affinity-weights takes a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--affinity-weights takes a JSON object, got {text!r}")
    return value


def cmd_affinity(args) -> int:
    import vismmoe

    from ..evaluation.errors import BadRecords
    from ..evaluation.scoring import prepare_samples
    from ..evaluation.tasks import get_task
    from . import analysis
    from .settings import check_keep, check_method

    keeps = [1.0 if k == 1 and isinstance(k, int) else k for k in args.keep]  # "1" in a list means keep all
    try:
        for k in keeps:
            check_keep(k)
        for m in args.prune:
            check_method(m)
        task = get_task(args.task)
        loaded = prepare_samples(task, args.data, args.split, args.limit, None, BadRecords())
        samples = [(s.image.load() if s.image is not None else None, s.prompt) for s in loaded.samples]
        extra = {"visual_affinity_weights": args.affinity_weights} if args.affinity_weights else {}
        engine = vismmoe.load(args.model, device=args.device, **extra)
        report = analysis.analyse(engine, samples, keeps, args.prune, args.max_new_tokens)
    except vismmoe.VismmoeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = analysis.write(report, Path(args.output), str(args.model), args.task)
    print(analysis.markdown(report, str(args.model), args.task))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
