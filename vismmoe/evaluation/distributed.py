"""Data-parallel evaluation: which process this is, and a barrier between processes.

Launched with `torchrun --nproc-per-node N` or `accelerate launch`, each process reads RANK / WORLD_SIZE /
LOCAL_RANK from the environment, evaluates every N-th pending sample with its own engine and appends
its records to its own file; the files are merged by rank 0 (so processes need a shared output directory).
Only barriers travel between processes, over gloo, which works with or without GPUs.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

# A barrier waits for the slowest process to finish its shard, which can take hours on a full benchmark.
_BARRIER_TIMEOUT = datetime.timedelta(hours=48)
_gloo_group: Any = None  # created once per process: re-creating process groups under torchrun can hang


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None  # None: the default group (gloo, ours or the launcher's)

    @classmethod
    def from_env(cls) -> "Processes":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        return cls(rank, world_size, int(os.environ.get("LOCAL_RANK", rank)), _barrier_group())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def _barrier_group():
    global _gloo_group
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=_BARRIER_TIMEOUT)
        atexit.register(dist.destroy_process_group)
    if dist.get_backend() == "gloo":
        return None
    if _gloo_group is None:  # the launcher's group is NCCL: add a gloo one for CPU-side barriers
        _gloo_group = dist.new_group(backend="gloo", timeout=_BARRIER_TIMEOUT)
    return _gloo_group
