"""Record routing traces of a model over the easy-VQA test split, through vismmoe.

Per request, step and MoE layer: the routed experts of every token, a visual/text flag per token and
the lookahead predictions (decode steps). The trace replays in vismmoe.offload.simulate.

    python eval/record_traces.py --model models/easyvqa-qwen3vlmoe --out eval/results/easyvqa_test_traces.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import vismmoe  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "easyvqa-qwen3vlmoe"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=0, help="first N test questions (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=16)  # "rectangle" + eos is 10 tokens
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import easy_vqa
    from tqdm import tqdm

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    n = len(questions) if args.limit <= 0 else min(args.limit, len(questions))
    # Every expert resident, so that recording does not depend on any cache setting.
    engine = vismmoe.load(args.model, expert_budget=1.0, prefetch=True, device=args.device)
    engine.start_trace(Path(args.model).name)
    correct = 0
    t0 = time.perf_counter()
    for i in tqdm(range(n), desc="recording"):
        result = engine.generate(image=paths[image_ids[i]], prompt=questions[i], max_new_tokens=args.max_new_tokens,
                                 request_id=f"test-{i}")
        correct += result.text.strip() == answers[i]
    engine.stop_trace(args.out)
    print(f"recorded {n} requests in {time.perf_counter() - t0:.0f} s -> {args.out} "
          f"(exact-match accuracy {correct / n:.4f})")


if __name__ == "__main__":
    main()
