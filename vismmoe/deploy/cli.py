"""`vismmoe probe`, `vismmoe devices`, `vismmoe plan` (registered by vismmoe/cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path


def register_cli(subparsers) -> None:
    pr = subparsers.add_parser("probe", help="measure this machine as a device profile (seconds)")
    pr.add_argument("--model", help="checkpoint directory: expert shapes and the disk it lives on")
    pr.add_argument("--output", help="write the profile YAML here (for `vismmoe plan --device P.yaml`)")
    pr.set_defaults(func=cmd_probe)

    dv = subparsers.add_parser("devices", help="list the shipped device profiles")
    dv.add_argument("name", nargs="?", help="show one profile's figures and their sources")
    dv.set_defaults(func=cmd_devices)

    pl = subparsers.add_parser("plan", help="fit a model to a device and write a deployment config")
    pl.add_argument("--model", required=True, help="checkpoint directory (or a directory with only config.json)")
    pl.add_argument("--device", required=True, help="a shipped profile name, a profile YAML, or 'probe' (this machine)")
    pl.add_argument("--trace", help="routing trace .npz of this model (default: the routing prior, stated)")
    pl.add_argument("--goal", choices=("latency", "memory"), default="latency")
    pl.add_argument("--max-gpu-memory", dest="max_gpu_memory", help="cap usable GPU memory, e.g. 6GiB")
    pl.add_argument("--context", type=int, help="tokens to hold in the KV cache (default: the prompt + max-new-tokens)")
    pl.add_argument("--image-size", type=int, default=448, dest="image_size", help="square image edge in pixels")
    pl.add_argument("--question-tokens", type=int, default=64, dest="question_tokens",
                    help="the longest question, in tokens; the prompt is the chat template (counted by the "
                    "checkpoint's processor) + the image's tokens + these")
    pl.add_argument("--max-new-tokens", type=int, default=64, dest="max_new_tokens")
    pl.add_argument("--output", help="write the deployment YAML here")
    pl.set_defaults(func=cmd_plan)


def _console():
    from rich.console import Console

    return Console()


def cmd_probe(args) -> int:
    import yaml

    from ..errors import VismmoeError
    from .probe import probe, profile_table
    from .profiles import parse_profile

    try:
        profile = probe(args.model)
        parse_profile(profile, "probe result")  # what plan will read back must be valid
    except VismmoeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _console().print(profile_table(profile))
    if args.output:
        Path(args.output).write_text(yaml.safe_dump(profile, sort_keys=False, width=200))
        print(f"wrote {args.output}")
    return 0


def cmd_devices(args) -> int:
    from rich.table import Table

    from ..errors import VismmoeError
    from .probe import profile_table
    from .profiles import load_profile, shipped_profiles

    try:
        if args.name:
            _console().print(profile_table(load_profile(args.name).to_dict()))
            return 0
        profiles = shipped_profiles()
    except VismmoeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = Table(title="shipped device profiles (configs/devices; `vismmoe devices NAME` shows sources)")
    for col in ("name", "kind", "memory GB", "mem GB/s", "host->GPU GB/s", "disk GB/s", "bf16 TFLOPS", "description"):
        table.add_column(col, overflow="fold", no_wrap=col == "name")
    for p in profiles:
        link = p.get("h2d_pinned_gbs")
        table.add_row(p.name, p.kind, f"{p['memory_gb']:g}", f"{p['memory_bandwidth_gbs']:g}",
                      f"{link:g}" if link else "shared DRAM", f"{p['disk_read_gbs']:g}", f"{p['bf16_tflops']:g}",
                      p.description)
    _console().print(table)
    return 0


def cmd_plan(args) -> int:
    from ..config import parse_budget
    from ..errors import VismmoeError
    from .model_info import model_info
    from .planner import make_plan
    from .profiles import load_profile, parse_profile
    from .writer import write_plan

    try:
        if args.device == "probe":
            from .probe import probe

            profile = parse_profile(probe(args.model), "probe result")
        else:
            profile = load_profile(args.device)
        cap = None
        if args.max_gpu_memory is not None:
            kind, value = parse_budget(args.max_gpu_memory)
            if kind != "bytes":
                raise VismmoeError(f"--max-gpu-memory takes a size such as 6GiB, got {args.max_gpu_memory!r}")
            cap = value
        trace = None
        if args.trace:
            from ..offload.trace import load_trace

            trace = load_trace(args.trace)
        plan = make_plan(model_info(args.model), profile, trace=trace, goal=args.goal, max_gpu_memory=cap,
                         context=args.context, image_size=args.image_size, max_new_tokens=args.max_new_tokens,
                         trace_path=args.trace, question_tokens=args.question_tokens)
    except (VismmoeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(plan.summary_lines()))
    if args.output:
        write_plan(plan, args.output)
        print(f"wrote {args.output}  (run: vismmoe run --model {args.model} --config {args.output})")
    return 0
