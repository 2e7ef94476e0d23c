"""GPU memory by part: what the engine holds on the device for a config, each part named.

The planner (planner.py), `expert_budget: auto` (auto.py) and emulation (emulate.py) count with these
parts, and `Result.stats.memory` reports the measured ones under the same names. Each part, and where
its size comes from in the engine:

  non_expert_weights  attention, norms, routers, embeddings, vision tower (model_info: safetensors headers)
  expert_cache        the slot pool, one allocation: slots x record bytes (offload/cache.py)
  kv_cache            static decode (static_decode.py) reserves 256, 512, 1024, ... positions and keeps up
                      to DecoderPool.MAX_HELD caches of different lengths; a cache that grows holds the old
                      and the new buffers while it copies. Held caches + the growth copy stay under twice
                      the context's bucket (a geometric sum), so static configs count 2 x the bucket.
                      transformers' dynamic cache (generate path) grows by concatenation: + one layer's copy.
  activations         the prefill's peak (ModelInfo.activation_peak_bytes: MoE pairs, hidden states,
                      attention scores if sdpa falls back to its math kernel, the vision tower's patches)
  graph_pool          static decode's captured steps keep their intermediates in a private CUDA graph pool
                      that nothing else may use: one decode step's buffers (logits, the hidden states,
                      attention over the cache), in 2 MiB segments, GRAPH_POOL_MIN at least
  cublas_workspace    torch gives every (cuBLAS handle, stream) pair its own workspace from the caching
                      allocator (32 MiB on compute capability >= 9.0, 8.125 MiB before: torch's defaults
                      ":4096:8" and ":4096:2:16:8"). GEMMs run on the compute stream, and for every captured
                      decode step on a warm-up side stream and its capture stream (a new pair per capture,
                      from torch's pool of 32 per device): static configs count all 33 (STATIC_STREAMS).
                      The copy stream's lookahead runs the stacked routers' Triton kernel, no GEMM. In the
                      recorded H200 run a process that had served a few static configs held ~0.5 GB
                      besides its engines (eval/results/validate_plan_emulated: each out-of-memory row's
                      allocated bytes = its own weights and cache + the previous setting's engine + 0.50
                      GB): about 15 such 32 MiB workspaces
  router_stack        static decode below a full budget with prefetch: every layer's router and norm
                      weights stacked once ([L, E, H] + [L, H], offload/router_stack.py)
  device_state        the slot table, the device cache state (owner, last use, pins, counts per expert),
                      copy lists and the prediction ledger (offload/device_core.py, residency.py, ledger.py)
  staging             mmap store: a ring of 4 page-locked record buffers; on a unified-memory device they
                      are the same DRAM (on a discrete GPU they are host memory, not counted here)
  margin              the caching allocator's rounding and fragmentation: weights of 1-10 MiB share 20 MiB
                      segments, small tensors 2 MiB ones, and a request's freed blocks stay reserved (the
                      emulated cap, like a real device, counts reserved memory): MARGIN_FIXED plus
                      MARGIN_SHARE of the transient parts

The measured side (eval/measure_memory.py) reads torch.cuda.memory_stats around load, prefill, capture
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
# Streams whose cuBLAS workspace static decode may leave allocated: the compute stream, and every capture's
# warm-up and capture streams, drawn from torch's pool of 32 streams per device (a new pair per capture:
# per cache length, and again after a cache grows); over a server's life all 32 can be drawn.
STATIC_STREAMS = 33
PARTS = ("non_expert_weights", "expert_cache", "kv_cache", "activations", "graph_pool", "cublas_workspace",
         "router_stack", "device_state", "staging", "margin")
TRANSIENT = ("activations", "graph_pool", "cublas_workspace", "margin")  # not held by a tensor the engine names


def cublas_workspace_bytes(compute_capability: str) -> int:
    """torch's default cuBLAS workspace per (handle, stream): ':4096:8' from sm90 on, ':4096:2:16:8' before."""
    try:
        major = int(str(compute_capability).split(".")[0])
    except ValueError:
        major = 9
    return 4096 * 1024 * 8 if major >= 9 else 4096 * 1024 * 2 + 16 * 1024 * 8


def gpu_parts(model: ModelInfo, dtype: str, *, slots: int, context: int, prompt_tokens: int, image_size: int,
              static: bool, prefetch: bool, store: str, unified: bool, compute_capability: str = "9.0",
              gpu: bool = True) -> dict:
    """Bytes by part (PARTS) of `model` served with `slots` expert slots for requests of up to `context`
    tokens (a prompt of `prompt_tokens` with an `image_size` image); `static`: static decode serves the
    decode steps. `gpu=False` (a CPU-only machine): the CUDA-only parts are 0."""
    b = DTYPE_BYTES[dtype]
    L, E = model.num_moe_layers, model.num_experts
    complete = slots >= L * E
    parts = dict.fromkeys(PARTS, 0)
    parts["non_expert_weights"] = model.non_expert_bytes(dtype)
    parts["expert_cache"] = slots * model.expert_bytes(dtype)  # one allocation; its rounding is in the margin
    bucket = model.kv_cache_bytes(context, dtype)
    if static:
        parts["kv_cache"] = 2 * bucket
    else:
        parts["kv_cache"] = model.kv_bytes(context, dtype) + model.kv_bytes(context, dtype) // max(1, 2 * model.num_attention_layers)
    parts["activations"] = model.activation_peak_bytes(min(prompt_tokens, context), image_size, dtype)
    if not gpu:
        return parts
    if static:
        parts["graph_pool"] = max(GRAPH_POOL_MIN, _round(3 * decode_step_bytes(model, context, dtype)))
    streams = STATIC_STREAMS if static else 1
    parts["cublas_workspace"] = min(streams, 32) * cublas_workspace_bytes(compute_capability)
    if static and prefetch and not complete:
        parts["router_stack"] = L * (E + 1) * model.hidden_size * b
    table = (L * E + 1) * 4
    device_core = 3 * (slots + 1) * 8 + (slots + 1) + 3 * (L * E + 1) * 8 + 16 * L * 8 if static and not complete else 0
    parts["device_state"] = table + device_core + 64 * 1024  # + the ledger, residency's copy lists, counters
    if store == "mmap" and unified and not complete:
        parts["staging"] = STAGING_BUFFERS * model.expert_bytes(dtype)
    parts["margin"] = int(MARGIN_FIXED + MARGIN_SHARE * (parts["activations"] + parts["graph_pool"] + parts["kv_cache"]))
    return parts


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
