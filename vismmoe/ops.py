"""Expert compute from cache slots: each fast op beside the plain torch reference it must match.

`experts_from_slots` runs every (token, expert) pair of a layer in two grouped GEMMs over the whole
slot pool (`torch.nn.functional.grouped_mm`, the op transformers' own `grouped_mm` experts use), with
the per-pair slot ids looked up on the device: no per-expert Python loop, no host sync, a fixed
number of launches per layer. `experts_from_slots_reference` computes the same thing pair by pair.

Every kernel of vismmoe/kernels/ has its one Python op here, beside its torch twin and the one-time
check against it on each GPU (`_checked_once`): the fast paths and their references are reviewed in one
place, which is why this module runs past ~400 lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch


# torch's grouped_mm handles fewer than 1024 groups (weight matrices) per call: a 1024-slot pool failed on an
# H200 with torch 2.11 ("Can't process more than 1024 groups"), so 1023 is the most.
MAX_GROUPS = 1023


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """grouped_mm runs on CUDA (sm90 kernels) in bfloat16; elsewhere the per-expert loop is used."""
    return (
        device.type == "cuda" and dtype == torch.bfloat16
        and (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"))
    )


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offsets)


def experts_from_slots(hidden, top_k_weights, slot_ids, gate_up, down, apply_gate, is_transposed=False):
    """out[t] = sum_j w[t, j] * down_s(apply_gate(gate_up_s(x[t]))) with s = slot_ids[t, j].

    hidden [T, H]; top_k_weights, slot_ids [T, k]; gate_up [S, 2I, H] and down [S, H, I] (or their
    transposes when `is_transposed`), views of the slot pool. Pairs are sorted by slot, each slot's
    rows multiply its weights in one grouped GEMM, and the weighted rows are summed per token in a
    fixed order (deterministic, as transformers' grouped_mm path does).
    """
    num_tokens, top_k = slot_ids.shape
    num_slots = gate_up.shape[0]
    slot_sorted, perm = torch.sort(slot_ids.reshape(-1))
    x = hidden[perm // top_k]
    # histc, not bincount: its output size does not depend on the data (no sync, graph-capturable).
    # CUDA histc takes integers; the CPU one only floats.
    binned = slot_sorted.int() if slot_sorted.is_cuda else slot_sorted.float()
    counts = torch.histc(binned, bins=num_slots, min=0, max=num_slots - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    h = _grouped_mm(x, gate_up if is_transposed else gate_up.transpose(-2, -1), offsets)
    h = apply_gate(h)
    h = _grouped_mm(h, down if is_transposed else down.transpose(-2, -1), offsets)
    h = h * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    out = h[inverse].view(num_tokens, top_k, -1).sum(dim=1)
    return out.to(hidden.dtype)


def experts_from_slots_reference(hidden, top_k_weights, slot_ids, gate_up, down, apply_gate, is_transposed=False):
    """The same computation, one (token, expert) pair at a time."""
    num_tokens, top_k = slot_ids.shape
    rows = []
    for t in range(num_tokens):
        acc = []
        for j in range(top_k):
            s = int(slot_ids[t, j])
            x = hidden[t : t + 1]
            h = x @ gate_up[s] if is_transposed else x @ gate_up[s].t()
            h = apply_gate(h)
            h = h @ down[s] if is_transposed else h @ down[s].t()
            acc.append(h * top_k_weights[t, j])
        rows.append(torch.cat(acc).sum(dim=0, keepdim=True))
    return torch.cat(rows).to(hidden.dtype)


# -- expert record copies decided on the device ------------------------------------------------------


def copy_records(src: torch.Tensor, dst: torch.Tensor, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]] for every i with dst_rows[i] >= 0.

    src [N, D] is the page-locked host slab, dst [S, D] the device slot pool; the row lists are device
    tensors. On CUDA one kernel reads the host rows directly over the bus (the slab is registered and
    mapped), so which rows move is decided on the device: no host sync and a fixed launch shape,
    capturable in a CUDA graph. Skipped rows cost nothing (their loads are masked off).
    """
    if dst.is_cuda:
        _copy_records_cuda(src, dst, src_rows, dst_rows)
    else:
        copy_records_reference(src, dst, src_rows, dst_rows)


def copy_records_reference(src, dst, src_rows, dst_rows) -> None:
    keep = dst_rows >= 0
    chosen = src_rows.to(keep.device)[keep].to(src.device)
    dst[dst_rows[keep]] = src[chosen].to(dst.device)


_COPY_BLOCK = 8192  # elements per program and iteration: 16 KiB of bf16 in flight per program
_COPY_PROGRAMS_PER_SM = 4  # enough loads in flight to fill a PCIe/C2C link (4 x 132 x 16 KiB on an H200)


def _copy_records_cuda(src, dst, src_rows, dst_rows) -> None:
    from .kernels import HostTensor

    source = src if src.is_cuda else HostTensor(src)
    # Triton launches on the current device: make it the destination's (an engine on cuda:1 is called
    # from threads whose current device is cuda:0).
    with torch.cuda.device(dst.device):
        launch_copy_kernel(source, dst, src_rows, dst_rows, _sm_count(dst.device) * _COPY_PROGRAMS_PER_SM)


def launch_copy_kernel(source, dst, src_rows, dst_rows, max_programs: int) -> None:
    """The copy kernel with at most `max_programs` programs (tests run it in Triton's interpreter).

    The grid is persistent, not one program per (row, chunk): every program walks the row list and
    copies its share of the chunks of each marked row. A decode step launches this once per layer with
    room for every row it might copy (thousands of chunks), and most launches copy nothing: with one
    program per chunk those launches still schedule thousands of programs that only find -1 and exit."""
    numel = dst.shape[1]
    chunks = _cdiv(numel, _COPY_BLOCK)
    programs = max(1, min(max_programs, dst_rows.numel() * chunks))
    _copy_kernel()[(programs,)](source, dst, src_rows, dst_rows, dst_rows.numel(), numel, chunks,
                                BLOCK=_COPY_BLOCK, num_warps=8)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


_KERNEL = None


def _copy_kernel():
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def copy_rows(src, dst, src_rows, dst_rows, n_rows, numel, chunks, BLOCK: tl.constexpr):
            program = tl.program_id(0)
            programs = tl.num_programs(0)
            for i in range(0, n_rows):
                dst_row = tl.load(dst_rows + i)
                if dst_row >= 0:
                    src_row = tl.load(src_rows + i)
                    for chunk in range(program, chunks, programs):
                        offs = chunk * BLOCK + tl.arange(0, BLOCK)
                        live = offs < numel
                        values = tl.load(src + src_row * numel + offs, mask=live)
                        tl.store(dst + dst_row * numel + offs, values, mask=live)

        _KERNEL = copy_rows
    return _KERNEL


def device_copy_available(src: torch.Tensor) -> bool:
    """Whether copy_records can run on the GPU from `src` (page-locked host memory, triton present)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return src.is_cuda or src.is_pinned()


# -- the cache's decisions on the device ------------------------------------------------------------
# One layer call of the cache's state machine (offload/core.py): the fused Triton kernel
# (kernels/cache_step.py) on CUDA, its torch twin (offload/device_core.py) elsewhere. `kernel=True`
# forces the kernel (tests run it under TRITON_INTERPRET=1 on the CPU), False the twin.


def cache_demand(state, layer: int, experts, n_visual, n_text, kernel: bool | None = None, score=None, quota=None,
                 in_place=None):
    """Make `experts` (distinct) of `layer` resident. Returns (slots, fill, src_rows): the copy list is
    (src_rows[i] -> fill[i]) for fill[i] >= 0. `score` = (pred, ledger counts, n_dist): also score the
    experts against the lookahead predictions made for this layer (offload/ledger.py), in the same launch.
    `quota`: per-layer slot quotas (int64 [L]) or None. `in_place`: an int64 device scalar (nonzero: misses
    take no slot, their slot id is -(flat row) - 1, the host row the decode kernel reads) or None (off)."""
    if _use_kernel(experts, kernel):
        from .kernels import cache_step

        return cache_step.cache_step(state, cache_step.DEMAND, layer, experts, n_visual=n_visual, n_text=n_text,
                                     score=score, quota=quota, in_place=in_place)
    from .offload import device_core, ledger

    slots, fill = device_core.demand(state, layer, experts, n_visual, n_text, quota, in_place)
    if score is not None:
        ledger.score_predicted(*score, layer, experts)
    return slots, fill, layer * state.shape[2] + experts


def cache_prefetch(state, layer: int, experts, valid, running: int, limit, kernel: bool | None = None, out=None,
                   quota=None):
    """Load up to `limit` (a device scalar; <= 0: off) of the predicted `experts[valid]` of `layer`,
    issued after layer `running`; `valid` None: every id >= 0 (-1 pads a row of predicted ids). Returns
    (src_rows, fill), the copy list, written into `out` = (src_rows, fill) when given."""
    if _use_kernel(experts, kernel):
        from .kernels import cache_step

        _, fill, src = cache_step.cache_step(state, cache_step.PREFETCH, layer, experts, valid=valid, limit=limit,
                                             running=running, out=out, quota=quota)
        return src, fill
    from .offload import device_core

    src, fill = device_core.prefetch(state, layer, experts, experts >= 0 if valid is None else valid, running, limit,
                                     quota)
    if out is not None:
        out[0].copy_(src)
        out[1].copy_(fill)
        return out
    return src, fill


def _use_kernel(experts, kernel: bool | None) -> bool:
    if kernel is not None:
        return kernel
    return experts.is_cuda and cache_kernel_available() and _cache_kernel_checked(experts.device)


_CACHE_KERNEL_OK = None
_CACHE_KERNEL_CHECKED: dict = {}  # device -> the kernel matched its torch twin there


def cache_kernel_available() -> bool:
    global _CACHE_KERNEL_OK
    if _CACHE_KERNEL_OK is None:
        try:
            import triton  # noqa: F401

            _CACHE_KERNEL_OK = True
        except ImportError:
            _CACHE_KERNEL_OK = False
    return _CACHE_KERNEL_OK


_log = logging.getLogger("vismmoe")
KERNEL_FIRST_USE_S: dict = {}  # (kernel, device) -> seconds its first use took (build + check against the twin)


def _checked_once(verdicts: dict, device: torch.device, compare, what: str, fallback: str) -> bool:
    """Run `compare(device)` (a fused kernel against its torch twin on small random inputs) once per device
    before trusting the kernel there; a build failure or a disagreement keeps the twin for this process,
    with one warning. Call it outside CUDA graph capture (the first static step runs eagerly before its
    capture)."""
    key = str(device)
    if key not in verdicts:
        start = time.perf_counter()
        try:
            ok, why = compare(device), "it disagrees with its torch twin"
        except Exception as exc:  # noqa: BLE001 - any failure: use the twin, say why
            ok, why = False, f"{type(exc).__name__}: {exc}"
        KERNEL_FIRST_USE_S[(what, key)] = seconds = time.perf_counter() - start
        if ok:
            cache = os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")
            _log.info("%s ready on %s in %.1f s (first use in this process: build or load from Triton's cache "
                      "%s, then a check against its torch twin)", what, device, seconds, cache)
        if not ok:
            import warnings

            warnings.warn(f"the {what} is not used on {device} ({why}); {fallback}", stacklevel=4)
        verdicts[key] = ok
    return verdicts[key]


def _cache_kernel_checked(device: torch.device) -> bool:
    return _checked_once(_CACHE_KERNEL_CHECKED, device, _compare_cache_kernel, "fused cache kernel",
                         "the cache's device decisions run as torch ops (offload/device_core.py): same decisions, "
                         "more launches")


def _compare_cache_kernel(device: torch.device, calls: int = 40, seed: int = 0) -> bool:
    """The kernel against its twin: one global pool, then per-layer slot quotas."""
    return _compare_cache_kernel_once(device, calls, seed, None) and \
        _compare_cache_kernel_once(device, calls, seed + 1, torch.tensor([3, 2, 2], device=device))


def _compare_cache_kernel_once(device: torch.device, calls: int, seed: int, quota) -> bool:
    """Every variant the engine launches: demand with and without the ledger scoring, prefetch with a
    valid mask and in the static path's form (id rows, -1 = none, copy list written in place)."""
    from .kernels import cache_step
    from .offload import device_core, ledger

    gen = torch.Generator().manual_seed(seed)
    S, L, E, k = 7, 3, 8, 2
    states = []
    for _ in range(2):
        table = torch.full((L * E + 1,), -1, dtype=torch.int32, device=device)
        st = device_core.DeviceState.empty(S, L, E, table)
        st.params.copy_(torch.tensor([0.5, 1.0, 0.0, 0.0], dtype=torch.float64))  # decayed counts: exercise scores
        states.append(st)
    pred = torch.full((L, 1, k), -1, dtype=torch.int64, device=device)  # ids predicted at layer l for l + 1
    modes = torch.tensor([0, 1], dtype=torch.int64, device=device)  # a layer call's miss path: copy, in place
    counts = [torch.zeros((3, 1, L), dtype=torch.int64, device=device) for _ in range(2)]
    out = torch.empty((2, k), dtype=torch.int64, device=device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for call in range(calls):
            layer = call % L
            experts = torch.randperm(E, generator=gen)[:k].to(device)
            if call % 3 == 2 and layer + 1 < L:
                valid = (torch.rand(k, generator=gen) < 0.7).to(device)
                if call % 2:
                    _, fill, src = cache_step.cache_step(states[0], cache_step.PREFETCH, layer + 1, experts,
                                                         valid=valid, limit=k, running=layer, quota=quota)
                else:
                    pred[layer, 0] = torch.where(valid, experts, -1)
                    _, fill, src = cache_step.cache_step(states[0], cache_step.PREFETCH, layer + 1, pred[layer, 0],
                                                         limit=k, running=layer, out=(out[0], out[1]), quota=quota)
                src_twin, fill_twin = device_core.prefetch(states[1], layer + 1, experts, valid, layer, k, quota)
                copies = [sorted(zip(r[f >= 0].tolist(), f[f >= 0].tolist())) for r, f in ((src, fill),
                                                                                           (src_twin, fill_twin))]
                if copies[0] != copies[1]:  # the same copies (the order of the list is free)
                    return False
            else:
                n_visual = torch.randint(0, 3, (k,), generator=gen).to(device)
                n_text = torch.randint(0, 3, (k,), generator=gen).to(device)
                n_dist = 1 if layer and call % 2 else 0
                in_place = modes[int(call % 5 == 1)]  # some calls serve their misses in place (zero-copy)
                slots, fill, _ = cache_step.cache_step(states[0], cache_step.DEMAND, layer, experts, n_visual=n_visual,
                                                       n_text=n_text, score=(pred, counts[0], n_dist), quota=quota,
                                                       in_place=in_place)
                slots_twin, fill_twin = device_core.demand(states[1], layer, experts, n_visual, n_text, quota,
                                                           in_place)
                ledger.score_predicted(pred, counts[1], n_dist, layer, experts)
                if not (torch.equal(slots, slots_twin) and torch.equal(fill, fill_twin)):
                    return False
            if call % L == L - 1:
                for st in states:
                    device_core.begin_step(st)
    a, b = states
    return torch.equal(*counts) and all(torch.equal(getattr(a, f), getattr(b, f)) for f in (
        "table", "owner", "last_use", "pin", "prefetched", "hits", "misses", "pf", "in_place"))


# -- lookahead prediction of a decode token ---------------------------------------------------------
# kernels/route_predict.py: RMSNorm, router logits and top-k ids of the next D layers in one launch;
# its twin is offload/router_stack.py's predict_experts_reference.


def predict_workspace(depth: int, num_experts: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction kernel's scratch for up to `depth` layers: fp32 logits [depth, E] and per-layer
    completion counts (int32 [depth]; zero between launches, each launch leaves them at zero)."""
    return (torch.empty((depth, num_experts), dtype=torch.float32, device=device),
            torch.zeros(depth, dtype=torch.int32, device=device))


def predict_experts(hidden, norm_w, router_w, eps: float, top_k: int, out=None, kernel: bool | None = None,
                    scratch=None, gate=None):
    """out[d] = the top-k expert ids (int64, ties to the lowest id) of router_w[d] @ rmsnorm(hidden, norm_w[d]);
    with `gate` (int64 [D], any stride: prefetch limits), out[d] = -1 where gate[d] <= 0, its router unread.

    hidden [H] (one token), norm_w [D, H], router_w [D, E, H]; out [D, top_k] (allocated if None). The
    kernel runs on CUDA with triton once its one-time check against the twin passed there; `kernel=True`
    forces it (tests run it under TRITON_INTERPRET=1), False the twin. `scratch`: the kernel's workspace
    (`predict_workspace`), which a caller inside a CUDA graph should own."""
    if out is None:
        out = torch.empty((router_w.shape[0], top_k), dtype=torch.int64, device=hidden.device)
    if kernel is None:
        kernel = hidden.is_cuda and cache_kernel_available() and _predict_kernel_checked(hidden.device)
    if kernel:
        from .kernels import route_predict

        return route_predict.predict_experts(hidden, norm_w, router_w, eps, top_k, out, scratch, gate=gate)
    from .offload.router_stack import predict_experts_reference

    out.copy_(predict_experts_reference(hidden, norm_w, router_w, eps, top_k, gate))
    return out


_PREDICT_CHECKED: dict = {}  # device -> the kernel matched its torch twin there


def _predict_kernel_checked(device: torch.device) -> bool:
    from .offload.router_stack import compare_predict_kernel

    return _checked_once(_PREDICT_CHECKED, device, compare_predict_kernel, "fused prediction kernel",
                         "static decode predicts with the torch twin (offload/router_stack.py)")


# -- fused decode expert compute (few tokens) -------------------------------------------------------
# kernels/fused_moe.py: gate_up, SiLU * up, down and the routing-weighted sum per token in two Triton
# launches, for decode steps of 1-16 tokens. Not on the engine's hot path yet (it has run only in
# Triton's interpreter); its twin is experts_from_slots_reference with `silu_mul`.

FUSED_MAX_TOKENS = 16


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """transformers' `_default_apply_gate` with `act_fn = silu` (Qwen3-VL-MoE's hidden_act): the first
    half of the gate_up output is the gate, the second half the up projection."""
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def fused_moe_decode(hidden, top_k_weights, slot_ids, gate_up, down, is_transposed=False,
                     kernel: bool | None = None, host_gate_up=None, host_down=None, install=None):
    """out[t] = sum_j w[t, j] * down_s(silu_mul(gate_up_s(x[t]))) with s = slot_ids[t, j].

    Shapes as `experts_from_slots`: hidden [T, H]; top_k_weights, slot_ids [T, k]; gate_up [S, 2I, H]
    and down [S, H, I] (or [S, H, 2I] / [S, I, H] when `is_transposed`). fp32 accumulation, output in
    hidden's dtype. The fused kernel runs on CUDA with triton once a one-time check against the twin
    passed on that device; `kernel=True` forces it (tests run it under TRITON_INTERPRET=1), False the twin.

    Zero-copy: with `host_gate_up` / `host_down` (views of the page-locked host slab in the pool's layout,
    [R, ...]), a slot id -r-1 is host row r, read over the bus by the kernel without taking a slot.

    Install (the copy miss path in the same launches): `install` = (fill, src), int64 [T, k] (or [T * k]),
    with the host views: each pair with fill >= 0 installs host row src into slot fill (the cache's copy
    list: `copy_records(slab, pool, src, fill)`) and computes from it; the result, pool included, is that
    of the copy followed by this op. A slot being installed must not be read by another pair.
    """
    _check_fused_inputs(hidden, top_k_weights, slot_ids, gate_up, down, is_transposed)
    zero_copy = host_gate_up is not None or host_down is not None
    if zero_copy or install is not None:
        _check_host_weights(gate_up, down, host_gate_up, host_down)
    if install is not None:
        _check_install(install, slot_ids)
    if kernel is None:
        kernel = hidden.is_cuda and cache_kernel_available() and _fused_moe_checked(hidden.device)
    if kernel:
        from .kernels import fused_moe

        return fused_moe.fused_moe_decode(hidden, top_k_weights, slot_ids, gate_up, down, is_transposed,
                                          host_gate_up=host_gate_up, host_down=host_down, install=install)
    if install is not None:  # the twin: the copy, then the compute from the slots
        fill, src = (t.reshape(-1) for t in install)
        keep = fill >= 0
        rows = src[keep].to(host_gate_up.device)
        gate_up[fill[keep]] = host_gate_up[rows].to(gate_up.device)
        down[fill[keep]] = host_down[rows].to(down.device)
    if zero_copy:  # the twin on the same weights, gathered per pair: pool slots and host rows
        ids = slot_ids.reshape(-1).tolist()
        pick = lambda pool, host: torch.stack([pool[s] if s >= 0 else host[-s - 1].to(pool.device)  # noqa: E731
                                               for s in ids])
        pairs = torch.arange(len(ids), device=slot_ids.device).view_as(slot_ids)
        return experts_from_slots_reference(hidden, top_k_weights, pairs, pick(gate_up, host_gate_up),
                                            pick(down, host_down), silu_mul, is_transposed)
    return experts_from_slots_reference(hidden, top_k_weights, slot_ids, gate_up, down, silu_mul, is_transposed)


def _check_install(install, slot_ids) -> None:
    from .errors import InputError

    if not (isinstance(install, (tuple, list)) and len(install) == 2):
        raise InputError("fused_moe_decode: install must be (fill, src), the cache's copy list per pair")
    for name, t in zip(("fill", "src"), install):
        if not isinstance(t, torch.Tensor) or t.numel() != slot_ids.numel() or t.dtype not in (torch.int32, torch.int64) \
                or t.device != slot_ids.device:
            raise InputError(f"fused_moe_decode: install's {name} must be an integer tensor of one entry per "
                             f"(token, expert) pair ({slot_ids.numel()}) on {slot_ids.device}; got "
                             f"{getattr(t, 'shape', t)!r}")


def _check_host_weights(gate_up, down, host_gate_up, host_down) -> None:
    from .errors import InputError

    if host_gate_up is None or host_down is None:
        raise InputError("fused_moe_decode zero-copy needs both host_gate_up and host_down")
    for name, pool, host in (("gate_up", gate_up, host_gate_up), ("down", down, host_down)):
        if host.shape[1:] != pool.shape[1:] or host.stride()[1:] != pool.stride()[1:] or host.dtype != pool.dtype:
            raise InputError(f"fused_moe_decode zero-copy: host_{name} must have the pool's record layout "
                             f"(shape [R, {', '.join(map(str, pool.shape[1:]))}], inner strides {pool.stride()[1:]}, "
                             f"{pool.dtype}); got {tuple(host.shape)}, {host.stride()[1:]}, {host.dtype}")
        if pool.is_cuda and not (host.is_cuda or host.is_pinned()):
            raise InputError(f"fused_moe_decode zero-copy: host_{name} must be page-locked (pinned) memory for "
                             "the GPU to read it")


def _check_fused_inputs(hidden, top_k_weights, slot_ids, gate_up, down, is_transposed) -> None:
    from .errors import InputError

    if hidden.dim() != 2 or slot_ids.dim() != 2 or top_k_weights.shape != slot_ids.shape:
        raise InputError(f"fused_moe_decode wants hidden [T, H] and top_k_weights, slot_ids [T, k]; got "
                         f"{tuple(hidden.shape)}, {tuple(top_k_weights.shape)}, {tuple(slot_ids.shape)}")
    if slot_ids.shape[0] != hidden.shape[0]:
        raise InputError(f"fused_moe_decode: {hidden.shape[0]} tokens but slot_ids has {slot_ids.shape[0]} rows")
    if slot_ids.shape[0] > FUSED_MAX_TOKENS:
        raise InputError(f"fused_moe_decode is for decode steps of at most {FUSED_MAX_TOKENS} tokens, got "
                         f"{slot_ids.shape[0]}; use experts_from_slots (grouped GEMMs) for prefill")
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise InputError(f"fused_moe_decode: slot_ids must be int32 or int64, got {slot_ids.dtype}")
    devices = {t.device for t in (hidden, top_k_weights, slot_ids, gate_up, down)}
    if len(devices) > 1:
        raise InputError(f"fused_moe_decode: all inputs must be on one device, got {sorted(map(str, devices))}")
    hid = hidden.shape[1]
    S = gate_up.shape[0]
    gu_out, gu_in = (gate_up.shape[2], gate_up.shape[1]) if is_transposed else gate_up.shape[1:]
    dn_out, dn_in = (down.shape[2], down.shape[1]) if is_transposed else down.shape[1:]
    if gate_up.dim() != 3 or down.dim() != 3 or down.shape[0] != S or gu_in != hid or dn_out != hid \
            or gu_out != 2 * dn_in:
        layout = "[S, H, 2I] and [S, I, H]" if is_transposed else "[S, 2I, H] and [S, H, I]"
        raise InputError(f"fused_moe_decode wants gate_up and down as {layout} with H = {hid}; got "
                         f"{tuple(gate_up.shape)} and {tuple(down.shape)} (is_transposed={is_transposed})")


def fused_moe_usable(module, device: torch.device) -> bool:
    """Can the fused decode kernel serve this experts module on `device`? CUDA with triton, a kernel
    that matched its twin there, and a gate that computes SiLU(gate) * up (checked on a probe: the kernel
    has SiLU built in, a model with another activation keeps the grouped GEMMs)."""
    if device.type != "cuda" or not cache_kernel_available():
        return False
    probe = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    try:
        silu_gate = torch.allclose(module._apply_gate(probe), silu_mul(probe), atol=1e-6)
    except Exception:  # noqa: BLE001 - a gate that cannot run on a probe is not SiLU * up
        return False
    return silu_gate and _fused_moe_checked(device)


_FUSED_MOE_CHECKED: dict = {}  # device -> the kernel matched its torch twin there


def _fused_moe_checked(device: torch.device) -> bool:
    return _checked_once(_FUSED_MOE_CHECKED, device, _compare_fused_moe, "fused decode MoE kernel",
                         "the twin experts_from_slots_reference runs instead")


def _compare_fused_moe(device: torch.device, seed: int = 0) -> bool:
    from .kernels import fused_moe

    gen = torch.Generator().manual_seed(seed)
    T, k, S, H, I = 3, 4, 5, 72, 40  # H, I not multiples of the blocks: the masks are exercised
    for transposed in (False, True):
        x = torch.randn(T, H, generator=gen)
        gate_up = torch.randn(S, 2 * I, H, generator=gen) / H**0.5
        down = torch.randn(S, H, I, generator=gen) / I**0.5
        if transposed:
            gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
        slots = torch.randint(0, S, (T, k), generator=gen)
        w = torch.softmax(torch.randn(T, k, generator=gen), -1)
        ref = experts_from_slots_reference(x, w, slots, gate_up, down, silu_mul, transposed)
        got = fused_moe.fused_moe_decode(*(t.to(device) for t in (x, w, slots, gate_up, down)), transposed)
        if not torch.allclose(got.cpu(), ref, atol=1e-4, rtol=1e-4):
            return False
        # The variant that reads host rows and installs misses (static decode at a partial budget): token 0's
        # experts from host rows, installed into slots S..S+k-1 of a larger pool; the pool must end as copied.
        host_gu, host_dn = gate_up.clone(), down.clone()
        if device.type == "cuda":
            host_gu, host_dn = host_gu.pin_memory(), host_dn.pin_memory()
        pool_gu = torch.cat([gate_up, torch.zeros_like(gate_up[:k])]).to(device)
        pool_dn = torch.cat([down, torch.zeros_like(down[:k])]).to(device)
        # Token 0's even pairs install (the others read their pool slots), so a store that leaked past its
        # pair would show in the pool's first S slots or in the slots not installed.
        ids = slots.clone()
        even = torch.arange(0, k, 2)
        ids[0, even] = S + even
        fill = torch.full_like(slots, -1)
        fill[0, even] = ids[0, even]
        got = fused_moe.fused_moe_decode(*(t.to(device) for t in (x, w, ids)), pool_gu, pool_dn, transposed,
                                         host_gate_up=host_gu, host_down=host_dn,
                                         install=(fill.to(device), slots.to(device)))
        want_gu = torch.cat([gate_up, torch.zeros_like(gate_up[:k])])
        want_dn = torch.cat([down, torch.zeros_like(down[:k])])
        want_gu[S + even], want_dn[S + even] = gate_up[slots[0, even]], down[slots[0, even]]
        if not (torch.allclose(got.cpu(), ref, atol=1e-4, rtol=1e-4) and torch.equal(pool_gu.cpu(), want_gu)
                and torch.equal(pool_dn.cpu(), want_dn)):
            return False
    return True


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm forward (Qwen3-VL-MoE, GLM-4.5V, Qwen2/3-MoE text and GLM vision norms), op
    for op: a module whose forward equals this on a probe can take the fused kernel (layers/rms_norm.py)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel: bool | None = None) -> torch.Tensor:
    """`rms_norm_reference` in one launch (kernels/rms_norm.py) on CUDA with triton, once a one-time check
    against the twin passed on that device; `kernel=True` forces it (tests run it under TRITON_INTERPRET=1),
    False the twin."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        from .errors import InputError

        raise InputError(f"rms_norm wants x [..., H] and weight [H]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if kernel is None:
        kernel = x.is_cuda and cache_kernel_available() and _rms_norm_checked(x.device)
    if kernel:
        from .kernels import rms_norm as fused

        return fused.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


_RMS_NORM_CHECKED: dict = {}  # device -> the kernel matched its torch twin there


def rms_norm_usable(device: torch.device) -> bool:
    """Can the fused RMSNorm kernel run on `device`? CUDA with triton and a kernel that matched its twin."""
    return device.type == "cuda" and cache_kernel_available() and _rms_norm_checked(device)


def _rms_norm_checked(device: torch.device) -> bool:
    return _checked_once(_RMS_NORM_CHECKED, device, _compare_rms_norm, "fused RMSNorm kernel",
                         "transformers' RMSNorm modules run unchanged")


def _compare_rms_norm(device: torch.device, seed: int = 0) -> bool:
    from .kernels import rms_norm as fused

    gen = torch.Generator().manual_seed(seed)
    for rows, H in ((3, 72), (5, 128), (2, 2048)):  # H not a power of two: the mask is exercised
        x = torch.randn(rows, H, generator=gen) * 3
        w = torch.randn(H, generator=gen)
        got = fused.rms_norm(x.to(device), w.to(device), 1e-6)
        if not torch.allclose(got.cpu(), rms_norm_reference(x, w, 1e-6), atol=1e-5, rtol=1e-5):
            return False
    return True


# -- the softmax top-k router of a decode step ------------------------------------------------------
# kernels/route_predict.py: logits, fp32 softmax, top-k and renormalisation in one launch (transformers
# runs six per layer and token); layers/router.py swaps it into the routers whose forward is this twin.

ROUTE_MAX_TOKENS = 16  # beyond this (prefill) the routers keep transformers' own forward


def route_top_k_reference(hidden: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool):
    """transformers' softmax top-k router (Qwen3-VL-MoE, Qwen3-MoE, OLMoE), op for op: (logits [T, E],
    weights [T, k] in the model dtype, ids [T, k])."""
    logits = torch.nn.functional.linear(hidden.reshape(-1, weight.shape[1]), weight)
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    values, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        values /= values.sum(dim=-1, keepdim=True)
    return logits, values.to(logits.dtype), ids


def route_top_k(hidden: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool,
                kernel: bool | None = None, scratch=None):
    """`route_top_k_reference` in one launch for up to ROUTE_MAX_TOKENS tokens on CUDA with triton, once a
    one-time check against the twin passed on that device; `kernel=True` forces it (tests run it under
    TRITON_INTERPRET=1), False the twin. Ties in probability go to the lowest expert id, which is the
    set torch.topk's CUDA kernel picks too. `scratch`: ops.predict_workspace(ROUTE_MAX_TOKENS, E, device)."""
    x = hidden.reshape(-1, weight.shape[1])
    if kernel is None:
        kernel = x.is_cuda and x.shape[0] <= ROUTE_MAX_TOKENS and cache_kernel_available() \
            and _route_checked(x.device)
    if kernel:
        from .kernels import route_predict

        return route_predict.route_top_k(x.contiguous(), weight, top_k, renormalize, scratch)
    return route_top_k_reference(x, weight, top_k, renormalize)


_ROUTE_CHECKED: dict = {}  # device -> the kernel matched its torch twin there


def route_kernel_usable(device: torch.device) -> bool:
    """Can the fused router kernel run on `device`? CUDA with triton and a kernel that matched its twin."""
    return device.type == "cuda" and cache_kernel_available() and _route_checked(device)


def _route_checked(device: torch.device) -> bool:
    return _checked_once(_ROUTE_CHECKED, device, compare_route_kernel, "fused router kernel",
                         "transformers' router modules run unchanged")


def compare_route_kernel(device: torch.device, seed: int = 0) -> bool:
    """The kernel against the twin on random cases (fp32 and bf16; weights within rounding, the same sets
    of experts), and on exact ties (small integers: every sum exact), where both must take the lowest ids."""
    from .kernels import route_predict

    gen = torch.Generator().manual_seed(seed)
    for tokens, E, H, k, dtype, ties in ((1, 8, 40, 2, torch.float32, False), (3, 60, 72, 8, torch.float32, False),
                                         (2, 128, 96, 8, torch.bfloat16, False), (4, 16, 48, 4, torch.float32, True),
                                         (2, 32, 40, 6, torch.bfloat16, True)):
        if ties:
            x = torch.randint(-1, 2, (tokens, H), generator=gen).float()
            w = torch.randint(-1, 2, (E, H), generator=gen).float()
        else:
            x, w = torch.randn(tokens, H, generator=gen) * 2, torch.randn(E, H, generator=gen) / H**0.5
        x, w = x.to(device, dtype), w.to(device, dtype)
        for renormalize in (True, False):
            logits, weights, ids = route_predict.route_top_k(x, w, k, renormalize)
            ref_logits, ref_weights, ref_ids = route_top_k_reference(x, w, k, renormalize)
            if ties:  # the reference's tie order is torch's; the rule is the lowest ids
                from .offload.router_stack import top_k_ids

                probs = torch.softmax(ref_logits.float(), -1)
                ref_ids = top_k_ids(probs, k)
                ref_weights = torch.gather(probs, 1, ref_ids)
                if renormalize:
                    ref_weights = ref_weights / ref_weights.sum(-1, keepdim=True)
                ref_weights = ref_weights.to(dtype)
            order, ref_order = ids.sort(-1), ref_ids.sort(-1)
            tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
            if not (torch.equal(order.values, ref_order.values)
                    and torch.allclose(torch.gather(weights, 1, order.indices).float(),
                                       torch.gather(ref_weights, 1, ref_order.indices).float(), **tol)
                    and torch.allclose(logits.float(), ref_logits.float(), **tol)):
                return False
    return True


# -- rotary position embedding of a decode step ------------------------------------------------------
# kernels/rotary.py: q and k rotated in one launch, bit for bit transformers' `apply_rotary_pos_emb` (ten
# launches); layers/rotary.py puts it where a model's modeling module applies that function.

ROTARY_MAX_TOKENS = 16  # beyond this (prefill) transformers' function runs


def rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """transformers' `apply_rotary_pos_emb` (Qwen3-VL-MoE text, Qwen3-MoE, OLMoE): x * cos + rotate_half(x) *
    sin for x = q and k, with rotate_half(x) = (-second half, first half)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary_fits(q, k, cos, sin, unsqueeze_dim: int = 1) -> bool:
    """Does the kernel take these inputs: q [B, Hq, S, D], k [B, Hk, S, D], cos and sin [B or 1, S, D], one
    half dtype (bf16 or fp16) and one CUDA device, S <= ROTARY_MAX_TOKENS, D even, every last dim
    contiguous? Not fp32: there the GPU compiler contracts x * cos + y * sin into a fused multiply-add,
    which rounds once where torch rounds twice (in half types the cast after each product prevents it)."""
    tensors = (q, k, cos, sin)
    if unsqueeze_dim != 1 or not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    B, _, S, D = q.shape
    return (k.shape[0] == B and k.shape[2] == S and k.shape[3] == D and tuple(cos.shape[1:]) == (S, D)
            and cos.shape[0] in (1, B) and D % 2 == 0 and 0 < S <= ROTARY_MAX_TOKENS
            and {t.dtype for t in tensors} in ({torch.bfloat16}, {torch.float16}) and len({t.device for t in tensors}) == 1
            and q.is_cuda and all(t.stride(-1) == 1 for t in tensors))


def rotary(q, k, cos, sin, unsqueeze_dim: int = 1, kernel: bool | None = None):
    """`rotary_reference` in one launch (kernels/rotary.py) where `rotary_fits` and a one-time check against
    the twin passed on the device; `kernel=True` forces it (tests run it under TRITON_INTERPRET=1), False
    the twin."""
    if kernel is None:
        kernel = rotary_fits(q, k, cos, sin, unsqueeze_dim) and cache_kernel_available() \
            and _rotary_checked(q.device)
    if kernel:
        from .kernels import rotary as fused

        return fused.rotary(q, k, cos, sin)
    return rotary_reference(q, k, cos, sin, unsqueeze_dim)


_ROTARY_CHECKED: dict = {}  # device -> the kernel matched its torch twin there


def rotary_usable(device: torch.device) -> bool:
    """Can the fused rotary kernel run on `device`? CUDA with triton and a kernel that matched its twin."""
    return device.type == "cuda" and cache_kernel_available() and _rotary_checked(device)


def _rotary_checked(device: torch.device) -> bool:
    return _checked_once(_ROTARY_CHECKED, device, compare_rotary_kernel, "fused rotary kernel",
                         "transformers' apply_rotary_pos_emb runs unchanged")


def compare_rotary_kernel(device: torch.device, seed: int = 0) -> bool:
    """The kernel against the twin, bit for bit, in bf16 and fp16, with q and k as the attention
    modules hand them over (a transposed view of [B, S, H, D]) and cos/sin of batch 1 or B."""
    from .kernels import rotary as fused

    gen = torch.Generator().manual_seed(seed)
    for B, HQ, HK, S, D, dtype in ((1, 4, 2, 1, 16, torch.float16), (2, 6, 3, 3, 40, torch.bfloat16),
                                   (1, 32, 4, 1, 128, torch.bfloat16), (2, 5, 5, 2, 64, torch.float16)):
        q = (torch.randn(B, S, HQ, D, generator=gen) * 3).to(device, dtype).transpose(1, 2)
        k = (torch.randn(B, S, HK, D, generator=gen) * 3).to(device, dtype).transpose(1, 2)
        cos = torch.randn(B if B > 1 else 1, S, D, generator=gen).to(device, dtype)
        sin = torch.randn(B if B > 1 else 1, S, D, generator=gen).to(device, dtype)
        got, want = fused.rotary(q, k, cos, sin), rotary_reference(q, k, cos, sin)
        if not all(torch.equal(a, b) for a, b in zip(got, want)):
            return False
    return True


# -- prefetch: auto's per-step decision (kernels/prefetch_gate.py) ------------------------------------


def prefetch_gate(state, step, params, pf, missed, true_pos, base, limits, kernel: bool | None = None,
                  count=None) -> None:
    """One static decode step of `prefetch: auto` (offload/autoprefetch.py): step += 1, the per-layer decision
    where it falls due (from the residency's prefetch counters pf and decode misses, and the device ledger's
    true positives [depth, L]), limits = base where on, else 0, and `count` (int64, one element, or None) =
    how many of the limits a lookahead acts on are on (`autoprefetch.limits_on`). One Triton launch on CUDA
    (once its one-time check against the twin passed there); `kernel=True` forces it (tests run it under
    TRITON_INTERPRET=1), False the twin (`autoprefetch.tick_torch`)."""
    if kernel is None:
        kernel = state.is_cuda and cache_kernel_available() and _gate_checked(state.device)
    if kernel:
        from .kernels import prefetch_gate as gate

        gate.prefetch_gate(state, step, params, pf, missed, true_pos, base, limits, count)
        return
    from .offload.autoprefetch import tick_torch

    tick_torch(state, step, params, pf, missed, true_pos, base, limits, count)


_GATE_CHECKED: dict = {}  # device -> the kernel matched its torch twin there


def _gate_checked(device: torch.device) -> bool:
    return _checked_once(_GATE_CHECKED, device, compare_prefetch_gate, "prefetch gate kernel",
                         "prefetch: auto decides with the torch twin (offload/autoprefetch.py)")


def compare_prefetch_gate(device, seed: int = 0, steps: int = 40, kernel: bool = True) -> bool:
    """The gate (kernel, or the twin with kernel=False) against `autoprefetch.tick` (numba, the host path's
    and the simulator's) over `steps` steps of random prefetch and miss counts: same state, same limits, the
    same count of limits on (`autoprefetch.limits_on`), exactly."""
    import numpy as np

    from .offload import autoprefetch as ap

    gen = np.random.default_rng(seed)
    L, D = 7, 2
    host = ap.new_state(L)
    params = ap.new_params(copy_s=float(gen.uniform(5e-6, 2e-4)), predict_s=float(gen.uniform(5e-6, 5e-5)))
    params[ap.PERIOD_P] = 3  # many decisions within the run
    base = gen.integers(0, 9, (L, D))
    pf = np.zeros((3, L + 1), np.int64)
    missed = np.zeros(L, np.int64)
    true_pos = np.zeros((D, L), np.int64)  # the ledger's, per distance
    f64 = dict(dtype=torch.float64, device=device)
    dev_state, dev_params = torch.from_numpy(host).to(**f64), torch.from_numpy(params).to(**f64)
    dev_step = torch.zeros(1, dtype=torch.int64, device=device)
    dev_base = torch.from_numpy(base).to(device)
    limits = torch.empty_like(dev_base)
    count = torch.full((1,), -1, dtype=torch.int64, device=device)
    for step in range(1, steps + 1):
        issued = gen.integers(0, 9, L)
        pf[0, :L] += issued
        pf[1, :L] += gen.integers(0, issued + 1)
        missed += gen.integers(0, 5, L)
        true_pos += gen.integers(0, 3, (D, L))
        ap.tick(host, params, pf, missed, true_pos.sum(0), step)
        on_device = [torch.from_numpy(a).to(device) for a in (pf, missed, true_pos)]
        prefetch_gate(dev_state, dev_step, dev_params, *on_device, dev_base, limits, kernel=kernel, count=count)
        want = np.where(host[ap.ON][:, None] > 0.5, base, 0)
        if not (np.array_equal(dev_state.cpu().numpy(), host) and np.array_equal(limits.cpu().numpy(), want)
                and int(dev_step.item()) == step and int(count.item()) == ap.limits_on(want)):
            return False
    return True
