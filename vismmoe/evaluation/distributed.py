"""Data-parallel evaluation: which process this is, and a barrier between processes.

Launched with `torchrun --nproc-per-node N` or `accelerate launch`, each process reads RANK / WORLD_SIZE /
LOCAL_RANK from the environment, evaluates every N-th pending sample with its own engine and appends
its records to its own file; the files are merged by rank 0 (so processes need a shared output directory).
Only barriers travel between processes, over gloo, which works with or without GPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

# A barrier waits for the slowest process to finish its shard, which can take hours on a full benchmark.
_BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None
    owns_process_group: bool = False

    @classmethod
    def from_env(cls) -> "Processes":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if dist.is_initialized():  # e.g. by accelerate; keep its group, add a gloo one for our barriers
            return cls(rank, world_size, local_rank, dist.new_group(backend="gloo", timeout=_BARRIER_TIMEOUT))
        dist.init_process_group("gloo", timeout=_BARRIER_TIMEOUT)
        return cls(rank, world_size, local_rank, None, owns_process_group=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owns_process_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_process_group = False
