"""Soak test: many requests against one engine, with bad requests and reconfigure calls interleaved.

Every good request must give exactly the tokens a fresh engine gives (0 wrong answers); every bad request
must raise the VismmoeError it should and leave the engine serving; memory after warm-up must stay flat
(< 5% growth of the process RSS, and of GPU memory on CUDA).

    python eval/soak.py --out eval/results [--model models/easyvqa-qwen3vlmoe] [--requests 1000] [--device cpu]

Writes soak.json into --out (counts, memory samples, growth, wrong answers, unexpected outcomes) and exits
1 when a check fails. Questions and images come from the installed easy-vqa package (test split).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import REPO  # noqa: E402

import vismmoe  # noqa: E402
from vismmoe import ConfigError, InputError  # noqa: E402

# Engine settings the soak cycles through with reconfigure (each must keep answers identical).
SETTINGS = [
    {"expert_budget": 0.25, "policy": "lfu"},
    {"expert_budget": "min", "policy": "lru", "prefetch": False},
    {"expert_budget": 0.5, "policy": "lfru", "decode": "auto"},
    {"expert_budget": 1.0, "policy": "lru"},
    {"expert_budget": 0.25, "policy": "cost", "prefetch_depth": 2},
    {"expert_budget": 0.25, "policy": "lru", "decode": "generate"},
    {"expert_budget": 0.5, "policy": "affinity", "decode": "auto"},
]
# Reconfigure calls that must be refused (ConfigError) without disturbing the engine.
BAD_RECONFIGURES = [
    {"foo": 1}, {"expert_budget": "lots"}, {"expert_budget": 1.5}, {"prefetch": "no"}, {"dtype": "float16"},
    {"policy": "random"}, {"decode": "static", "policy": "cost", "expert_budget": 0.25},
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bad_requests(tmp: Path, good_image: str):
    """Requests that must each raise InputError whose message names the problem."""
    from PIL import Image

    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    truncated = tmp / "truncated.png"
    truncated.write_bytes(Path(good_image).read_bytes()[:100])
    closed = Image.new("RGB", (32, 32))
    closed.close()
    return [  # (name, generate kwargs, a fragment the InputError's message must contain)
        ("missing file", dict(image=str(tmp / "nope.png"), prompt="what shape?"), "does not exist"),
        ("corrupt image", dict(image=str(corrupt), prompt="what shape?"), "not an image file"),
        ("truncated image", dict(image=str(truncated), prompt="what shape?"), "truncated or corrupt"),
        ("directory as image", dict(image=str(tmp), prompt="what shape?"), "is a directory"),
        ("URL", dict(image="https://example.com/cat.png", prompt="what shape?"), "URLs are not fetched"),
        ("0x0 image", dict(image=Image.new("RGB", (0, 0)), prompt="what shape?"), "no pixels"),
        ("1x5000 image", dict(image=Image.new("RGB", (1, 5000)), prompt="what shape?"), "1x5000"),
        ("closed image", dict(image=closed, prompt="what shape?"), "closed"),
        ("image of wrong type", dict(image=12345, prompt="what shape?"), "image must be"),
        ("empty prompt", dict(image=good_image, prompt=""), "prompt must be a non-empty string"),
        ("lone surrogate", dict(image=good_image, prompt="what \ud800 shape?"), "not valid Unicode"),
        ("placeholder in prompt", dict(image=good_image, prompt="what <|image_pad|> shape?"), "<|image_pad|>"),
        ("prompt over the context", dict(image=None, prompt="x " * 5000), "context is"),
        ("max_new_tokens=0", dict(image=good_image, prompt="what shape?", max_new_tokens=0), "max_new_tokens"),
        ("do_sample='no'", dict(image=good_image, prompt="what shape?", do_sample="no"), "do_sample"),
        ("unknown kwarg", dict(image=good_image, prompt="what shape?", foo=1), "['foo']"),
        ("num_beams=0", dict(image=good_image, prompt="what shape?", num_beams=0), "num_beams"),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "easyvqa-qwen3vlmoe"))
    parser.add_argument("--out", required=True, help="directory for soak.json")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--questions", type=int, default=40, help="distinct questions cycled through")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of requests before memory is measured")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    import easy_vqa
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    qs, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    pool = [(paths[image_ids[i]], qs[i], answers[i]) for i in range(args.questions)]
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="vismmoe-soak-"))
    bad = bad_requests(tmp, pool[0][0])

    # Reference answers from a fresh engine at full budget on the plain generate path.
    reference_engine = vismmoe.load(args.model, device=args.device, expert_budget=1.0, decode="generate")
    reference = [reference_engine.generate(image=p, prompt=q, max_new_tokens=args.max_new_tokens).token_ids
                 for p, q, _ in pool]
    labels_right = sum(reference_engine.tokenizer.decode(t, skip_special_tokens=True).strip() == a
                       for t, (_, _, a) in zip(reference, pool))
    reference_engine.close()
    del reference_engine
    gc.collect()

    engine = vismmoe.load(args.model, device=args.device, **SETTINGS[0])
    info = engine.info()
    cuda = info.device.startswith("cuda")
    counts = {"good": 0, "bad": 0, "reconfigure": 0, "bad_reconfigure": 0}
    wrong, unexpected, samples = [], [], []
    decode_paths: dict[str, int] = {}
    warm_at = int(args.requests * args.warmup)
    warm_rss = warm_gpu = None
    t0 = time.perf_counter()
    setting_index = 0
    for i in range(args.requests):
        kind = rng.random()
        if i and i % 25 == 0:  # a reconfigure call: every third one is bad
            if (i // 25) % 3 == 0:
                overrides = BAD_RECONFIGURES[counts["bad_reconfigure"] % len(BAD_RECONFIGURES)]
                counts["bad_reconfigure"] += 1
                try:
                    engine.reconfigure(**overrides)
                    unexpected.append({"request": i, "bad_reconfigure": repr(overrides), "outcome": "accepted"})
                except ConfigError:
                    pass
                except Exception as exc:  # noqa: BLE001 - recorded as a failure of the soak
                    unexpected.append({"request": i, "bad_reconfigure": repr(overrides), "outcome": repr(exc)})
            else:
                setting_index = (setting_index + 1) % len(SETTINGS)
                engine.reconfigure(**{**SETTINGS[0], "prefetch": True, "prefetch_depth": 1, "decode": "auto",
                                      **SETTINGS[setting_index]})
                counts["reconfigure"] += 1
        if kind < 0.15:  # a bad request
            name, kwargs, fragment = bad[counts["bad"] % len(bad)]
            counts["bad"] += 1
            try:
                engine.generate(**kwargs)
                unexpected.append({"request": i, "bad": name, "outcome": "accepted"})
            except InputError as exc:
                if fragment not in str(exc):
                    unexpected.append({"request": i, "bad": name, "outcome": f"message without {fragment!r}: {exc}"})
            except Exception as exc:  # noqa: BLE001 - recorded as a failure of the soak
                unexpected.append({"request": i, "bad": name, "outcome": f"{type(exc).__name__}: {exc}"[:300]})
        else:
            q = rng.randrange(len(pool))
            path, question, _ = pool[q]
            result = engine.generate(image=path, prompt=question, max_new_tokens=args.max_new_tokens)
            counts["good"] += 1
            decode_paths[result.stats.decode_path] = decode_paths.get(result.stats.decode_path, 0) + 1
            if result.token_ids != reference[q]:
                wrong.append({"request": i, "question": q, "setting": SETTINGS[setting_index],
                              "got": result.token_ids, "want": reference[q]})
        if i + 1 == warm_at or (i + 1) % 50 == 0 or i + 1 == args.requests:
            gc.collect()
            sample = {"request": i + 1, "rss_bytes": rss_bytes(), "elapsed_s": round(time.perf_counter() - t0, 1)}
            if cuda:
                sample["gpu_allocated_bytes"] = torch.cuda.memory_allocated(info.device)
                sample["gpu_reserved_bytes"] = torch.cuda.memory_reserved(info.device)
            samples.append(sample)
            if i + 1 == warm_at:
                warm_rss, warm_gpu = sample["rss_bytes"], sample.get("gpu_reserved_bytes")
            print(json.dumps(sample), flush=True)

    end = samples[-1]
    after = [s for s in samples if s["request"] >= warm_at]
    rss_growth = (max(s["rss_bytes"] for s in after) - warm_rss) / warm_rss
    gpu_growth = None
    if cuda and warm_gpu:
        gpu_growth = (max(s["gpu_reserved_bytes"] for s in after) - warm_gpu) / warm_gpu
    ok = not wrong and not unexpected and rss_growth < 0.05 and (gpu_growth is None or gpu_growth < 0.05)
    report = {
        "ok": ok, "model": args.model, "device": info.device, "dtype": f"torch.{info.dtype}",
        "requests": args.requests, "counts": counts, "decode_paths": decode_paths,
        "distinct_questions": len(pool), "max_new_tokens": args.max_new_tokens,
        "reference": "tokens of a fresh engine at full budget on the generate path",
        "reference_label_accuracy": labels_right / len(pool),
        "wrong_answers": len(wrong), "wrong_examples": wrong[:10],
        "unexpected_outcomes": len(unexpected), "unexpected_examples": unexpected[:20],
        "warmup_requests": warm_at, "rss_after_warmup_bytes": warm_rss, "rss_end_bytes": end["rss_bytes"],
        "rss_growth_after_warmup": round(rss_growth, 4),
        "gpu_reserved_growth_after_warmup": None if gpu_growth is None else round(gpu_growth, 4),
        "elapsed_s": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
        "memory_samples": samples,
        "settings": SETTINGS, "bad_requests": [name for name, _, _ in bad],
        "bad_reconfigures": [repr(b) for b in BAD_RECONFIGURES],
        "versions": {"vismmoe": vismmoe.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({k: report[k] for k in ("ok", "counts", "wrong_answers", "unexpected_outcomes",
                                             "rss_growth_after_warmup", "gpu_reserved_growth_after_warmup",
                                             "elapsed_s")}))
    engine.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
