"""What the eval/ scripts share: offline settings, GPU timing, random requests and report files.

A script puts the repository on sys.path and imports this module before anything that imports
transformers (the environment below must be set first):

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from eval.common import ...  # noqa: E402
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Checkpoints are local directories: never ask the hub, and keep transformers' notices out of the logs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The prompt of the benchmark requests on the full-size random model (bench_offload, profile_static,
# validate_plan): a fixed token count, so that every measured request has the same shapes.
BENCH_PROMPT = "what is the color of the shape on the left of the image?"


def random_image(rs, height: int, width: int | None = None):
    """A PIL image of uniform random pixels drawn from the numpy RandomState `rs`."""
    from PIL import Image

    return Image.fromarray((rs.rand(height, width or height, 3) * 255).astype("uint8"))


def random_requests(n: int, seed: int = 0) -> list:
    """`n` (image, prompt) pairs: images of random size (64-256 px a side), prompts of 3-10 random words."""
    import random

    import numpy as np

    rng, rs = random.Random(seed), np.random.RandomState(seed)
    words = "what is the color shape of this object left right top how many red blue circle square".split()
    out = []
    for _ in range(n):
        h, w = rs.randint(64, 257), rs.randint(64, 257)
        out.append((random_image(rs, h, w), " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + "?"))
    return out


def graph_time(fn, repeats: int, device=None, trials: int = 5) -> tuple[float, str]:
    """Seconds per call of fn(i), i in range(repeats), and how it was timed.

    On a GPU the `repeats` calls are captured in one CUDA graph (as static decode runs its steps: no
    launch gaps between kernels) after an eager warm-up, and the fastest of `trials` replays counts;
    if capture fails the calls are timed eagerly and the mode says why. On the CPU: wall time after one
    warm-up call."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        fn(0)
        start = time.perf_counter()
        for i in range(repeats):
            fn(i)
        return (time.perf_counter() - start) / repeats, "cpu wall"

    def eager():
        for i in range(repeats):
            fn(i)

    mode, run = "cuda graph", eager
    try:
        side = torch.cuda.Stream(device)  # warm-up off the default stream, as graph capture requires
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            eager()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
        run = graph.replay
    except Exception as exc:  # noqa: BLE001 - report and time eagerly instead
        mode = f"eager ({type(exc).__name__}: {str(exc)[:80]})"
    run()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(trials):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3 / repeats)
    return min(times), mode


def graph_us(fn, reps: int = 20) -> float:
    """Microseconds per call of fn() (graph_time, without the index or the mode)."""
    return graph_time(lambda i: fn(), reps)[0] * 1e6


def device_name(device=None) -> str:
    """The name of `device` (default: the current GPU if there is one), or "cpu"."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def free_memory() -> None:
    """Drop what the last engine or model left: Python garbage, then the CUDA caching allocator's blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def output_dir(path) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_report(out: Path, name: str, report: dict, markdown: str | None = None, indent: int = 1) -> None:
    """`report` as out/<name>.json (values JSON does not know are written as strings) and `markdown` as
    out/<name>.md."""
    out = output_dir(out)
    (out / f"{name}.json").write_text(json.dumps(report, indent=indent, default=str))
    if markdown is not None:
        (out / f"{name}.md").write_text(markdown)


def hbm_gbps(device=None, gib: int = 1) -> float:
    """GB/s of a device-to-device copy of `gib` GiB, counted as read + write (the HBM reference)."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device=device or "cuda")
    dst = torch.empty_like(src)
    seconds, _ = graph_time(lambda i: dst.copy_(src), 4, src.device)
    return 2 * src.numel() / seconds / 1e9


def decode_bytes_per_token(engine, context: int) -> dict:
    """Bytes one greedy decode token must read at least, by part: the text decoder's non-expert weights
    (all but the embedding table, of which one row), the lm_head, top_k experts per MoE layer, and the KV
    cache over `context` positions. (The vision tower is not run while decoding.)"""
    from vismmoe.static_decode import _text_model

    model, layout = engine.model, engine.layout
    text = _text_model(model, layout)
    embed = text.get_input_embeddings() if hasattr(text, "get_input_embeddings") else None
    skip = {id(p) for p in embed.parameters()} if embed is not None else set()
    weights = sum(p.numel() * p.element_size() for p in text.parameters() if id(p) not in skip)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = head.weight.numel() * head.weight.element_size() if head is not None else 0
    if embed is not None:
        weights += embed.weight.shape[-1] * embed.weight.element_size()
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * engine.store.record_bytes \
        // engine.store.record_numel
    experts = layout.top_k * len(layout.layers) * engine.store.record_bytes
    return {"non_expert_weights": weights, "lm_head": lm_head, "experts": experts, "kv_cache": kv,
            "total": weights + lm_head + experts + kv}
