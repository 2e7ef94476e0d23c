"""GPU memory by part: what the engine holds on the device for a config, each part named.

One accounting, `gpu_parts`, for everyone who counts: the planner (planner.py) calls it for the largest
request of its envelope (the longest prompt, its image, max_new_tokens) with its bounds for what the
engine may hold; `expert_budget: auto` (auto.py) likewise; emulation (emulate.py) calls it at load and
before every request with the request at hand, what the engine has allocated (measured, each part at
least its planned size) and the KV caches it really holds. gpu_parts is monotone in the request, and the
planner's KV bound (kv_bound) is the most the engine's decoder pool can hold for its envelope, so a
config the planner writes passes the engine's checks for every request inside the envelope
(tests/test_plan_grid.py checks it over a grid). `Result.stats.memory` reports the measured parts under
the same names. Each part, and where its size comes from in the engine:

  non_expert_weights  attention, norms, routers, embeddings, vision tower (model_info: safetensors headers)
  expert_cache        the slot pool, one allocation: slots x record bytes (offload/cache.py)
  kv_cache            static decode (static_decode.py) reserves 256, 512, 1024, ... positions and keeps up
                      to DecoderPool.MAX_HELD caches of different lengths; a cache that grows holds its old
                      buffer (at most half the new one) while it copies, and the pool first drops a held
                      cache of the length it grows to. transformers' dynamic cache (generate path) grows by
                      concatenation: + one layer's copy, next to any static caches still held.
                      static_kv_bytes / dynamic_kv_bytes count a given state (the engine's), kv_bound the
                      worst state a request inside the planner's envelope can meet.
  activations         the prefill's peak (ModelInfo.activation_peak_bytes: MoE pairs, hidden states,
                      attention scores if sdpa falls back to its math kernel, the vision tower's patches)
  graph_pool          static decode's captured steps keep their intermediates in a private CUDA graph pool
                      that nothing else may use: one decode step's buffers (logits, the hidden states,
                      attention over the cache), in 2 MiB segments, GRAPH_POOL_MIN at least. Every decoder's
                      graphs share the one pool, under `prefetch: auto` two per cache length (the full step
                      and the one without the lookahead): nothing a step allocates outlives it, so each
                      capture reuses the blocks the earlier ones freed and the pool is the largest step's,
                      not a sum (the GPU test in tests/test_autoprefetch.py bounds the second graph's
                      growth of the pool to one segment)
  cublas_workspace    torch gives every (cuBLAS handle, stream) pair its own workspace from the caching
                      allocator (32 MiB on compute capability >= 9.0, 8.125 MiB before: torch's defaults
                      ":4096:8" and ":4096:2:16:8"). GEMMs run on the compute stream, and for every captured
                      decode step on the engine's one capture stream (Engine.capture_stream: warm-up and
                      capture both run there; before, every capture drew two new streams from torch's pool
                      of 32, and a process that had served a few static configs held ~0.5 GB of such
                      workspaces, eval/results/validate_plan_emulated). The copy stream's lookahead runs
                      the stacked routers' Triton kernel, but its torch twin (where the kernel is not
                      usable) is a GEMM: counted too. Static: 3 streams, generate: 2 (STREAMS).
  router_stack        static decode below a full budget with prefetch: every layer's router and norm
                      weights stacked once ([L, E, H] + [L, H], offload/router_stack.py)
  kernel_scratch      on CUDA, the fused router kernel's workspace of every router (layers/router.py:
                      ROUTE_MAX_TOKENS x E float32 + counts) and the stacked routers' prediction workspace
                      ([L, E] float32 + [L] counts)
  device_state        the slot table, the device cache state (owner, last use, pins, counts per expert),
                      copy lists and the prediction ledger (offload/device_core.py, residency.py, ledger.py)
  staging             mmap store: a ring of 4 page-locked record buffers; on a unified-memory device they
                      are the same DRAM (on a discrete GPU they are host memory, not counted here)
  margin              the caching allocator's rounding and fragmentation: weights of 1-10 MiB share 20 MiB
                      segments, small tensors 2 MiB ones, and a request's freed blocks stay reserved (the
                      emulated cap, like a real device, counts reserved memory): MARGIN_FIXED plus
                      MARGIN_SHARE of the transient parts

The measured side (Engine.held_bytes for what the engine names; eval/measure_memory.py) reads torch.cuda.memory_stats around load, prefill, capture
and decode and writes planned vs measured bytes per part, so each allowance is checked on a GPU.
"""

from __future__ import annotations

import math

from .model_info import DTYPE_BYTES, ModelInfo

MiB = 2**20
SEGMENT = 2 * MiB  # the caching allocator's small-block segment; large blocks round to it too
GRAPH_POOL_MIN = 32 * MiB  # H100 gpu_check: static minus generate activations 73-97 MB = 2 workspaces + 6-30 MB
MARGIN_FIXED = 64 * MiB
MARGIN_SHARE = 0.10
STAGING_BUFFERS = 4  # ExpertCache._staging
# Streams that may run cuBLAS GEMMs, each with its own workspace: the compute stream, the copy stream
# (the lookahead's torch twin), and with static decode the engine's capture stream.
STREAMS = {"static": 3, "generate": 2}
PARTS = ("non_expert_weights", "expert_cache", "kv_cache", "activations", "graph_pool", "cublas_workspace",
         "router_stack", "kernel_scratch", "device_state", "staging", "margin")
TRANSIENT = ("activations", "graph_pool", "cublas_workspace", "margin")  # not held by a tensor the engine names
HELD = ("non_expert_weights", "expert_cache", "router_stack", "kernel_scratch", "device_state")  # Engine.held_bytes


def cublas_workspace_bytes(compute_capability: str) -> int:
    """torch's default cuBLAS workspace per (handle, stream): ':4096:8' from sm90 on, ':4096:2:16:8' before."""
    try:
        major = int(str(compute_capability).split(".")[0])
    except ValueError:
        major = 9
    return 4096 * 1024 * 8 if major >= 9 else 4096 * 1024 * 2 + 16 * 1024 * 8


def gpu_parts(model: ModelInfo, dtype: str, *, slots: int, prompt_tokens: int, new_tokens: int, visual_tokens: int,
              static: bool, prefetch: bool, store: str, unified: bool, compute_capability: str = "9.0",
              gpu: bool = True, kv_cache: int | None = None, held: dict | None = None) -> dict:
    """Bytes by part (PARTS) of `model` served with `slots` expert slots, for a request of `prompt_tokens`
    (`visual_tokens` of them from images) and `new_tokens` (0 and 0: no request, what a load holds).
    `static`: the engine serves decode steps by static decode (captured graphs). `kv_cache`: the KV bytes
    of a known state (the engine's: static_kv_bytes / dynamic_kv_bytes), else kv_bound's worst case.
    `held`: what the engine has allocated, measured by part (Engine.held_bytes): a part counts the larger
    of that and its planned size. `gpu=False` (a CPU-only machine): the CUDA-only parts are 0."""
    b = DTYPE_BYTES[dtype]
    L, E = model.num_moe_layers, model.num_experts
    complete = slots >= L * E
    context = prompt_tokens + new_tokens
    parts = dict.fromkeys(PARTS, 0)
    parts["non_expert_weights"] = model.non_expert_bytes(dtype)
    parts["expert_cache"] = slots * model.expert_bytes(dtype)  # one allocation; its rounding is in the margin
    if context:
        parts["kv_cache"] = kv_cache if kv_cache is not None else kv_bound(model, dtype, context, static)
        parts["activations"] = model.activation_peak_bytes(prompt_tokens, visual_tokens, dtype)
    if gpu:
        if static:
            parts["graph_pool"] = max(GRAPH_POOL_MIN, _round(3 * decode_step_bytes(model, max(1, context), dtype)))
        parts["cublas_workspace"] = STREAMS["static" if static else "generate"] * cublas_workspace_bytes(compute_capability)
        stacked = static and prefetch and not complete
        if stacked:
            parts["router_stack"] = L * (E + 1) * model.hidden_size * b
        from ..ops import ROUTE_MAX_TOKENS

        parts["kernel_scratch"] = L * ROUTE_MAX_TOKENS * (E + 1) * 4 + (L * (E + 1) * 4 if stacked else 0)
        table = (L * E + 1) * 4
        device_core = 3 * (slots + 1) * 8 + (slots + 1) + 3 * (L * E + 1) * 8 + 16 * L * 8 if static and not complete else 0
        parts["device_state"] = table + device_core + 64 * 1024  # + the ledger, residency's copy lists, counters
        if store == "mmap" and unified and not complete:
            parts["staging"] = STAGING_BUFFERS * model.expert_bytes(dtype)
    for name, value in (held or {}).items():
        parts[name] = max(parts[name], int(value))
    if gpu:
        parts["margin"] = int(MARGIN_FIXED + MARGIN_SHARE * (parts["activations"] + parts["graph_pool"] + parts["kv_cache"]))
    return parts


# -- KV caches -----------------------------------------------------------------------------------------
def static_kv_bytes(model: ModelInfo, dtype: str, *, final: int, old: int = 0, others=()) -> int:
    """KV bytes while a static-decode request runs: its cache at `final` positions, the `old` positions of
    the buffer it grows from (0 if it does not grow), and the other decoders' caches (their lengths)."""
    return model.kv_bytes(final + old + sum(others), dtype)


def dynamic_kv_bytes(model: ModelInfo, dtype: str, tokens: int, others=()) -> int:
    """KV bytes of transformers' dynamic cache at `tokens` positions (it grows by torch.cat: one layer's
    old and new tensors at once), next to static caches still held (`others`: their lengths)."""
    dynamic = model.kv_bytes(tokens, dtype)
    return dynamic + dynamic // max(1, 2 * model.num_attention_layers) + model.kv_bytes(sum(others), dtype)


def kv_bound(model: ModelInfo, dtype: str, context: int, static: bool) -> int:
    """The most KV bytes the engine can hold during a request of at most `context` tokens, over every
    state its decoder pool can be in after earlier requests of at most `context` tokens: static decode
    (a request's final length f, the length it started at, up to MAX_HELD - 1 other cached lengths, none
    of them f when it grows), and, where static decode is the path, a request that takes the generate
    path anyway (sampling) next to MAX_HELD static caches."""
    from ..static_decode import DecoderPool, cache_length

    top = cache_length(context, None)
    lengths = []
    n = cache_length(1, None)
    while n <= top:
        lengths.append(n)
        n *= 2
    others_max = DecoderPool.MAX_HELD - 1
    worst = dynamic_kv_bytes(model, dtype, context, lengths[::-1][:DecoderPool.MAX_HELD] if static else ())
    if not static:
        return worst
    for final in lengths:
        for start in (n for n in lengths if n <= final):
            grows = start < final
            others = [n for n in lengths[::-1] if n != start and not (grows and n == final)][:others_max]
            worst = max(worst, static_kv_bytes(model, dtype, final=final, old=final // 2 if grows else 0, others=others))
    return worst


def decode_step_bytes(model: ModelInfo, context: int, dtype: str) -> int:
    """The buffers one decode step allocates (what a captured step keeps in its graph pool): float32
    logits and their masked copy, a few hidden-state buffers per layer, attention scores over the cache
    and the fused MoE kernel's float32 intermediate."""
    from ..static_decode import cache_length

    b = DTYPE_BYTES[dtype]
    positions = cache_length(context, None)
    heads = model.num_heads or max(1, model.num_kv_heads) * 8
    inter = model.record_numel // (3 * model.hidden_size) if model.hidden_size else 0
    per_layer = 12 * model.hidden_size * b + heads * positions * 4 + model.top_k * inter * 4
    return 3 * model.vocab_size * 4 + model.num_moe_layers * per_layer


def _round(n: int) -> int:
    return int(math.ceil(n / SEGMENT) * SEGMENT) if n else 0


def total(parts: dict) -> int:
    return int(sum(parts.values()))
