"""Record routing traces of a bundled model over its task's test split, through vismmoe.

Per request, step and MoE layer: the routed experts of every token, a visual/text flag per token and
the lookahead predictions (decode steps). The trace replays in vismmoe.offload.simulate.

The questions, images and prompts are the eval harness's own (`vismmoe eval --task T`, test split), so a
trace is recorded on exactly what the accuracy numbers were measured on.

    python eval/record_traces.py --out eval/results/easyvqa_test_traces.npz      # easy-VQA, the demo model
    python eval/record_traces.py --task scenevqa --model models/scenevqa-qwen3vlmoe \
        --out eval/results/scenevqa_test_traces.npz                             # scene-VQA, the scene model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import REPO  # noqa: E402

import vismmoe  # noqa: E402
from vismmoe.evaluation.errors import BadRecords  # noqa: E402
from vismmoe.evaluation.scoring import prepare_samples  # noqa: E402
from vismmoe.evaluation.tasks import get_task  # noqa: E402

# The bundled model of each task (the default --model).
MODELS = {"easyvqa": REPO / "models" / "easyvqa-qwen3vlmoe", "scenevqa": REPO / "models" / "scenevqa-qwen3vlmoe"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(MODELS), default="easyvqa")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the task's bundled model)")
    ap.add_argument("--out", required=True, help="trace file to write (.npz)")
    ap.add_argument("--limit", type=int, default=0, help="first N test questions (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=16)  # the longest answer ("rectangle") + eos is 10 tokens
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    model = Path(args.model) if args.model else MODELS[args.task]
    from tqdm import tqdm

    spec = get_task(args.task)
    samples = prepare_samples(spec, None, "test", args.limit or None, None, BadRecords(False)).samples
    # Every expert resident, so that recording does not depend on any cache setting.
    engine = vismmoe.load(model, expert_budget=1.0, prefetch=True, device=args.device)
    engine.start_trace(model.name)
    correct = 0
    t0 = time.perf_counter()
    for sample in tqdm(samples, desc=f"recording {args.task}"):
        result = engine.generate(image=sample.image.load(), prompt=sample.prompt, max_new_tokens=args.max_new_tokens,
                                 request_id=f"test-{sample.question_id}")
        correct += result.text.strip() == sample.references[0]
    engine.stop_trace(args.out)
    accuracy = correct / max(1, len(samples))
    print(f"recorded {len(samples)} {args.task} requests in {time.perf_counter() - t0:.0f} s -> {args.out} "
          f"(exact-match accuracy {accuracy:.4f})")
    return {"requests": len(samples), "accuracy": accuracy}


if __name__ == "__main__":
    main()
