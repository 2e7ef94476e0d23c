"""The host-decided path: every layer call's cache decisions made on the host after one readback.

Per layer call: one small readback (per-expert token counts by modality, plus the lookahead
predictions made entering the layer), demand loads through `ExpertCache.acquire` (offload/core.py
decides), compute from the cache slots (in waves when a layer needs more distinct experts than there
are slots), then prefetch of the next layers' predicted experts. Prefills always run here; decode
steps too when they go through transformers' `generate`.

Miss paths (offload/miss_paths.py): in a decode step (a step after the prefill of at most
ops.FUSED_MAX_TOKENS tokens), a layer whose path is zerocopy or cpu serves its misses in place (the
cache gives them no slot): zerocopy reads them from the slab in the decode kernel (or the loop), cpu
has them computed by the CPU worker (offload/cpu_experts.py) while the device computes the resident
experts. Where a step's compute cannot read host rows (grouped GEMMs only), zerocopy copies.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from . import miss_paths
from .cache import ExpertCache
from .compute import ExpertCompute, expert_output
from .context import Context
from .cpu_experts import CpuExperts
from .ledger import PredictionLedger


class HostPath:
    def __init__(self, cache: ExpertCache, compute: ExpertCompute, ledger: PredictionLedger, context: Context,
                 prefetch_limits: np.ndarray, observers: list):
        self.cache = cache
        self.compute = compute
        self.ledger = ledger
        self.context = context
        self.prefetch_limits = prefetch_limits  # [L, depth] copies per prefetch call (shared, set in place)
        self.observers = observers  # callables(layer, step, top_k_index, visual_mask, predicted), e.g. a trace
        L = cache.num_layers
        self.miss_paths = np.zeros(L, np.int64)  # per layer: miss_paths.COPY / ZEROCOPY / CPU (shared, set in place)
        self.cpu = CpuExperts(cache.store, compute.is_transposed)
        self.decode_calls = np.zeros((2, L), np.int64)  # decode-step (hits, misses) per layer: miss_paths.MissPlanner
        self._zero_record = None  # a zero expert on the device: the fused kernel's stand-in for CPU-served pairs

    def begin_step(self) -> None:
        self.ledger.begin_step()
        self.cache.begin_step()

    def _grouped(self, layer, module, hidden_states, top_k_index, top_k_weights, path=miss_paths.COPY):
        cache = self.cache
        if cache.complete:
            gate_up, down = cache.layer_views(layer)
            slot_ids = top_k_index
        else:
            gate_up, down = cache.gate_up_view, cache.down_view
            slot_ids = cache.slot_table[layer][top_k_index].to(torch.int64)
        if path == miss_paths.COPY:
            return self.compute.run(module, hidden_states, top_k_weights, slot_ids, gate_up, down)
        if path == miss_paths.ZEROCOPY:  # misses read from their host rows
            slot_ids = torch.where(slot_ids >= 0, slot_ids, -(layer * cache.num_experts + top_k_index) - 1)
            if cache.pacer is not None:  # an emulated link: in-place reads take its time, as copies do
                cache.pacer.pace_host(int(torch.unique(top_k_index[slot_ids < 0]).numel()),
                                      torch.cuda.current_stream(cache.device) if cache.cuda else None, path="static")
            return self.compute.run(module, hidden_states, top_k_weights, slot_ids, gate_up, down,
                                    host=cache.store.host_views())
        # cpu: the device computes the resident pairs (the missed ones read a zero expert), the CPU the rest
        job = self.cpu.submit(module, layer, torch.unique(top_k_index[slot_ids < 0]).tolist(), hidden_states,
                              top_k_index, top_k_weights)
        out = self.compute.run(module, hidden_states, top_k_weights, torch.where(slot_ids >= 0, slot_ids, -1),
                               gate_up, down, host=self._zero_views())
        extra = CpuExperts.summed(job.result(), top_k_index, *hidden_states.shape, hidden_states.dtype)
        return out + extra.to(out.device, non_blocking=True)

    def _zero_views(self):
        if self._zero_record is None:
            store = self.cache.store
            self._zero_record = torch.zeros((1, store.record_numel), dtype=store.dtype, device=self.cache.device)
            self._zero_record_views = (self._zero_record[:, : store.gate_up_numel].view(1, *store.layout.gate_up_shape),
                                       self._zero_record[:, store.gate_up_numel :].view(1, *store.layout.down_shape))
        return self._zero_record_views

    def path_for(self, layer: int, num_tokens: int, step_index: int) -> int:
        """The miss path of this layer call: the layer's in decode steps, copy in prefills; zerocopy copies
        where the step's compute cannot read host rows (or there is no slab)."""
        path = int(self.miss_paths[layer])
        if step_index == 0 or num_tokens > ops.FUSED_MAX_TOKENS:
            return miss_paths.COPY
        if path == miss_paths.ZEROCOPY and not (self.compute.reads_host(num_tokens) and self.cache.store.slab is not None):
            return miss_paths.COPY
        return path

    def run_layer(self, layer: int, module, hidden_states, top_k_index, top_k_weights):
        cache, compute, step = self.cache, self.compute, self.context.get()
        if cache.complete and compute.from_slots(hidden_states.shape[0]) and not self.observers:
            # Every expert is resident and nothing is ever evicted: no host decision, no sync.
            cache.count_resident_use(layer, top_k_index)
            return self._grouped(layer, module, hidden_states, top_k_index, top_k_weights)
        num_tokens, top_k = top_k_index.shape
        num_experts = cache.num_experts
        # Pairs (token, slot) ordered slot-major, as transformers' eager loop visits them, so that the
        # per-expert rows (and hence the arithmetic) are identical to the reference implementation.
        flat = top_k_index.t().reshape(-1)
        visual = step.visual_mask
        if visual is not None and visual.numel() == num_tokens:
            modality = (~visual).to(torch.int64).repeat(top_k)  # 0 visual, 1 text
        else:
            visual = None
            modality = torch.ones_like(flat)
        counts = torch.zeros(2 * num_experts, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, modality * num_experts + flat, torch.ones_like(flat))
        prediction = step.predictions.pop(layer, None)
        if prediction is not None:
            counts = torch.cat([counts, prediction.reshape(-1).to(torch.int64)])
        host = counts.cpu().numpy()  # the one readback of this layer: counts and lookahead predictions
        n_visual, n_text = host[:num_experts], host[num_experts : 2 * num_experts]
        masks = host[2 * num_experts :].reshape(-1, num_experts) if prediction is not None else None
        per_expert = n_visual + n_text
        experts = np.flatnonzero(per_expert)
        predicted_here = self.ledger.score(layer, experts, decode=step.index > 0)
        for observer in self.observers:
            observer(layer, step.index, top_k_index, visual, predicted_here.get(1))

        wave_size = cache.wave_size(layer)
        path = self.path_for(layer, num_tokens, step.index)
        in_place = path != miss_paths.COPY
        pooled = compute.from_slots(num_tokens) and (not in_place or compute.fused_for(num_tokens))
        if pooled and len(experts) <= wave_size and (cache.complete or cache.num_slots <= ops.MAX_GROUPS):
            slots = cache.acquire(layer, experts, n_visual[experts], n_text[experts], in_place)
            self._count(layer, slots, path, step.index)
            out = self._grouped(layer, module, hidden_states, top_k_index, top_k_weights,
                                path if (slots < 0).any() else miss_paths.COPY)
            cache.release(slots)
            return self._after_layer(layer, masks, out)

        offsets = np.concatenate([[0], np.cumsum(per_expert[experts])])
        order = torch.argsort(flat, stable=True)
        token_idx = order % num_tokens
        pair_weights = top_k_weights.t().reshape(-1)[order]
        out = torch.zeros_like(hidden_states)
        job = None
        for start in range(0, len(experts), wave_size):
            wave = slice(start, start + wave_size)
            wave_experts = experts[wave]
            slots = cache.acquire(layer, wave_experts, n_visual[wave_experts], n_text[wave_experts], in_place)
            self._count(layer, slots, path, step.index)
            if path == miss_paths.CPU and (slots < 0).any():  # (a decode step: one wave)
                job = self.cpu.submit(module, layer, wave_experts[slots < 0].tolist(), hidden_states, top_k_index,
                                      top_k_weights)
            for j, slot in enumerate(slots):
                lo, hi = int(offsets[start + j]), int(offsets[start + j + 1])
                tokens = token_idx[lo:hi]
                if slot < 0 and job is not None:  # the CPU's result, added in its turn (the same sums)
                    h = job.result()[int(wave_experts[j])].to(out.device)
                else:
                    gate_up, down = cache.weights(int(slot)) if slot >= 0 else \
                        cache.store.split(cache.store.record(layer, int(wave_experts[j])))
                    h = expert_output(module, hidden_states[tokens], gate_up.to(out.device), down.to(out.device),
                                      pair_weights[lo:hi, None], compute.is_transposed)
                out.index_add_(0, tokens, h.to(out.dtype))
            cache.release(slots)
        if len(experts) > wave_size:
            cache.counters.waves += 1
        return self._after_layer(layer, masks, out)

    def _count(self, layer: int, slots: np.ndarray, path: int, step_index: int) -> None:
        """Misses served in place, by path; a decode step's hits and misses (the auto planner's input)."""
        served = int((slots < 0).sum())
        if served:
            counters = self.cache.counters
            (counters.zero_copy if path == miss_paths.ZEROCOPY else counters.cpu)[layer] += served
        if step_index > 0:
            missed = self.cache.last_missed
            self.decode_calls[0, layer] += len(slots) - missed
            self.decode_calls[1, layer] += missed

    def _after_layer(self, layer, masks, out):
        if masks is not None:
            self._prefetch(layer, masks)
        return out

    def _prefetch(self, layer: int, masks: np.ndarray) -> None:
        # Issued after this layer's demand loads, nearest layer first: demand never queues behind them.
        for distance, mask in enumerate(masks, start=1):
            target = layer + distance
            if target >= self.cache.num_layers:
                break
            predicted = np.flatnonzero(mask)
            limit = int(self.prefetch_limits[target, distance - 1])
            if limit <= 0 and not self.observers:
                continue  # switched off (prefetch: auto): not scored, as the static path skips it
            self.ledger.expect(target, distance, predicted)
            self.cache.prefetch(target, predicted, limit, running=layer)
