"""`vismmoe affinity`: how pruning reshapes expert demand, measured from routing traces.

For every (visual_keep, visual_prune) setting the engine answers the task's first `limit` questions
with a routing trace recording (transformers' generate path, every expert resident, so the trace is the
model's own routing), then reports per MoE layer, separately for visual and text tokens:
  distinct_experts   experts a request's tokens of that kind use at that layer (mean over requests)
  perplexity         exp(entropy) of the request's expert-use distribution at that layer (its
                     effective number of experts)
  top20_share        share of the request's routed selections that fall on its 20% most-used experts
and per layer the next-layer prediction recall of the lookahead predictor (prefill and decode), and
for the cache the prefill and decode hit rates and bytes moved when the trace is replayed (LRU,
recorded predictions prefetched) at a few budgets through vismmoe.offload.simulate.
Writes affinity.json, summary.md and PNG plots (working set vs keep per layer; visual and text
expert-use heatmaps) into the output directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

BUDGETS = (0.125, 0.25, 0.5)  # fractions of all experts held by the simulated cache


def routing_stats(trace) -> dict:
    """Per layer and token kind: mean distinct experts, perplexity and top-20% share per request."""
    L, E = trace.meta.num_layers, trace.meta.num_experts
    top = max(1, math.ceil(0.2 * E))
    counts = {kind: np.zeros((trace.num_requests, L, E), np.int64) for kind in ("visual", "text")}
    for g in trace.groups():
        for kind, rows in (("visual", g.experts[g.visual]), ("text", g.experts[~g.visual])):
            if rows.size:
                counts[kind][g.request, g.layer] += np.bincount(rows.reshape(-1).astype(np.int64), minlength=E)
    out = {}
    for kind, c in counts.items():
        used = c.sum(-1) > 0  # [R, L] requests that had tokens of this kind at this layer
        distinct = (c > 0).sum(-1)
        p = c / np.maximum(c.sum(-1, keepdims=True), 1)
        entropy = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)
        share = np.sort(c, axis=-1)[..., ::-1][..., :top].sum(-1) / np.maximum(c.sum(-1), 1)

        def mean(x):
            return [float(x[used[:, layer], layer].mean()) if used[:, layer].any() else None for layer in range(L)]

        out[kind] = dict(distinct_experts=mean(distinct), perplexity=mean(np.exp(entropy)), top20_share=mean(share),
                         usage=c.sum(0).tolist())
    return out


def cache_stats(trace, budgets=BUDGETS) -> list[dict]:
    from ..offload.simulate import simulate

    total = trace.meta.num_layers * trace.meta.num_experts
    rows = []
    for fraction in budgets:
        slots = max(trace.meta.top_k, int(fraction * total))
        r = simulate(trace, policy="lru", budget_slots=slots, prefetch="trace" if trace.has_predictions else "none")
        prefill_hits, prefill_misses = r.hits - r.decode_hits, r.misses - r.decode_misses
        rows.append(dict(budget=fraction, slots=slots, hit_rate=r.hit_rate, decode_hit_rate=r.decode_hit_rate,
                         prefill_hit_rate=prefill_hits / max(prefill_hits + prefill_misses, 1),
                         bytes_moved=r.bytes_moved))
    return rows


def analyse(engine, samples, keeps, methods, max_new_tokens: int = 16, progress=None) -> dict:
    """Record one trace per setting and compute its statistics. `samples`: [(PIL image, prompt)]."""
    engine.reconfigure(expert_budget=1.0, decode="generate")
    settings = [(keep, "none" if keep == 1.0 else method) for keep in keeps
                for method in (methods[:1] if keep == 1.0 else methods)]
    results = []
    for keep, method in settings:
        engine.reconfigure(visual_keep=keep, **({} if method == "none" else {"visual_prune": method}))
        engine.start_trace()
        kept = []
        for i, (image, prompt) in enumerate(samples):
            result = engine.generate(image=image, prompt=prompt, max_new_tokens=max_new_tokens, request_id=str(i))
            kept.append((result.stats.visual_tokens_kept, result.stats.visual_tokens_total))
            if progress:
                progress(keep, method, i)
        trace = engine.stop_trace().to_trace()
        prediction = {}
        for phase in ("prefill", "decode"):  # None where nothing was predicted (e.g. prefetch_prefill off)
            quality = trace.prediction_quality(phase)
            prediction[phase] = [float(r) if n else None for r, n in zip(quality["recall"], quality["groups"])]
        results.append(dict(keep=keep, method=method, requests=len(samples),
                            visual_tokens_kept=float(np.mean([k for k, _ in kept])),
                            visual_tokens_total=float(np.mean([t for _, t in kept])),
                            routing=routing_stats(trace), next_layer_recall=prediction, cache=cache_stats(trace)))
    engine.reconfigure(visual_keep=1.0)
    return dict(layers=len(engine.layout.layers), experts=engine.layout.num_experts, top_k=engine.layout.top_k,
                settings=results)


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x:.1%}"


def markdown(report: dict, model: str, task: str) -> str:
    lines = [f"# Visual-expert affinity: {model} on {task}", "",
             f"{report['layers']} MoE layers, {report['experts']} experts, top-{report['top_k']}; "
             f"{report['settings'][0]['requests']} requests per setting. Means over layers; per-layer values "
             "are in affinity.json.", "",
             "| keep | method | visual kept | distinct experts (visual) | (text) | perplexity (visual) | (text) | "
             "top-20% share (visual) | (text) | next-layer recall prefill / decode | "
             + " | ".join(f"hit rate prefill / decode @{b:g}" for b in BUDGETS) + " | "
             + " | ".join(f"MiB moved @{b:g}" for b in BUDGETS) + " |",
             "|" + "---|" * (10 + 2 * len(BUDGETS))]
    for s in report["settings"]:
        v, t = s["routing"]["visual"], s["routing"]["text"]
        rec = s["next_layer_recall"]
        cells = [str(s["keep"]), s["method"], f"{s['visual_tokens_kept']:.0f}/{s['visual_tokens_total']:.0f}",
                 f"{_mean(v['distinct_experts']):.2f}", f"{_mean(t['distinct_experts']):.2f}",
                 f"{_mean(v['perplexity']):.2f}", f"{_mean(t['perplexity']):.2f}",
                 f"{_mean(v['top20_share']):.1%}", f"{_mean(t['top20_share']):.1%}",
                 f"{_pct(_mean(rec['prefill']))} / {_pct(_mean(rec['decode']))}"]
        cells += [f"{c['prefill_hit_rate']:.1%} / {c['decode_hit_rate']:.1%}" for c in s["cache"]]
        cells += [f"{c['bytes_moved'] / 2**20:.1f}" for c in s["cache"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path) -> list[Path]:
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    paths = []
    settings = report["settings"]
    methods = sorted({s["method"] for s in settings if s["method"] != "none"})
    base = [s for s in settings if s["method"] == "none"]
    fig = Figure(figsize=(4 * max(1, len(methods)), 3.6))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(methods)), sharey=True))
    for ax, method in zip(axes, methods or ["none"]):
        rows = sorted(base + [s for s in settings if s["method"] == method], key=lambda s: -s["keep"])
        for layer in range(report["layers"]):
            ax.plot([s["keep"] for s in rows], [s["routing"]["visual"]["distinct_experts"][layer] for s in rows],
                    marker="o", alpha=0.8, label=f"layer {layer}")
        ax.set_title(method)
        ax.set_xlabel("visual_keep")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("distinct experts / request (visual)")
    axes[-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(out / "working_set_vs_keep.png")
    fig.savefig(paths[-1], dpi=120)
    for s in (settings[0], settings[-1]):
        fig = Figure(figsize=(10, 4))
        axes = fig.subplots(1, 2)
        for ax, kind in zip(axes, ("visual", "text")):
            usage = np.asarray(s["routing"][kind]["usage"], dtype=float)
            usage = usage / np.maximum(usage.sum(-1, keepdims=True), 1)
            image = ax.imshow(usage, aspect="auto", cmap="viridis")
            ax.set_title(f"{kind} tokens: expert use per layer")
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
            fig.colorbar(image, ax=ax)
        fig.suptitle(f"keep {s['keep']} {s['method']}")
        fig.tight_layout()
        paths.append(out / f"expert_use_keep{s['keep']}_{s['method']}.png")
        fig.savefig(paths[-1], dpi=120)
    return paths


def write(report: dict, out: Path, model: str, task: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "affinity.json").write_text(json.dumps(dict(model=model, task=task, **report), indent=2))
    (out / "summary.md").write_text(markdown(report, model, task))
    return [out / "affinity.json", out / "summary.md", *plots(report, out)]
