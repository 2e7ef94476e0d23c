"""The CPU miss path (the seed paper's): a decode step's missed experts computed on the CPU.

A layer whose miss path is `cpu` (offload/miss_paths.py) serves its misses in place: the cache gives
them no slot (offload/core.py), and their routing-weighted outputs for the step's few tokens are
computed here, on the CPU, straight from the host store's record (the page-locked or pageable slab, or
the safetensors files for `store: mmap`), in one worker thread, while the compute device runs the
layer's resident experts; the caller then adds them. torch's CPU kernels release the GIL, so the
worker's matmuls overlap the main thread's launches and waits.

The arithmetic is compute.expert_output, the loop's own: on a CPU device the results are the copy
path's bits (tests/test_miss_paths.py); on a GPU they differ from the GPU's by float rounding only.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .compute import expert_output


class CpuExperts:
    def __init__(self, store, is_transposed: bool):
        self.store = store
        self.is_transposed = is_transposed
        self._pool = None  # one worker thread, started on first use
        self._staging = None  # an mmap store's record buffer (the worker is the only reader of it)

    def submit(self, module, layer: int, experts: list[int], hidden: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor) -> Future:
        """Start computing `experts` (ascending ids of `layer`) for the step's tokens. The future's result
        is {expert: weighted output rows [tokens routed to it, H]} on the CPU, rows in (k, token) order
        (the loop's). The step's hidden state, routing ids and weights are read back here (a few rows)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vismmoe-cpu-experts")
        x, index, weights = (t.detach().to("cpu") for t in (hidden, top_k_index, top_k_weights))
        return self._pool.submit(self._run, module, layer, list(experts), x, index, weights)

    def _run(self, module, layer, experts, x, index, weights):
        out = {}
        by_k = index.t()
        with torch.inference_mode():
            for expert in experts:
                pos, tokens = torch.where(by_k == expert)
                if self.store.slab is None and self._staging is None:
                    self._staging = torch.empty(self.store.record_numel, dtype=self.store.dtype)
                gate_up, down = self.store.split(self.store.record(layer, expert, staging=self._staging))
                out[expert] = expert_output(module, x[tokens], gate_up, down, weights[tokens, pos, None],
                                            self.is_transposed)
        return out

    @staticmethod
    def summed(results: dict, index: torch.Tensor, num_tokens: int, hidden: int, dtype) -> torch.Tensor:
        """The results added per token, experts ascending: [num_tokens, hidden] on the CPU."""
        out = torch.zeros(num_tokens, hidden, dtype=dtype)
        by_k = index.t().cpu()
        for expert in sorted(results):
            _, tokens = torch.where(by_k == expert)
            out.index_add_(0, tokens, results[expert].to(dtype))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
