"""Where this process stands among the ranks of a data job (`torchrun -m vlp.curate select ...`, `torchrun
-m vlp.data.build reshard ...`).

Scoring shards are dealt to ranks (shard i to rank i mod world size), as `vlp.curate score` deals
them. Ranks exchange their large intermediate results (k-means samples, spilled embeddings, removed
rows) as files in a directory every rank can read (on several nodes: shared storage, as the scores
and the output already are); torch.distributed is used for barriers and for small sums only, so no
collective ever carries a column of the pool.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


class Ranks:
    """rank and world size; `barrier` and `sum` are no-ops for one process."""

    def __init__(self, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.rank, self.world = rank, world

    @classmethod
    def from_env(cls) -> Ranks:
        """This process under torchrun (joins a gloo group for barriers), else one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def mine(self, shard: int) -> bool:
        return shard % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, a: np.ndarray) -> np.ndarray:
        """Element-wise sum of an int64 array over the ranks (each rank's counts: k integers)."""
        a = np.asarray(a, dtype=np.int64)
        if self.world == 1:
            return a
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(a.copy())
        dist.all_reduce(t)
        return t.numpy()

    def gather(self, value: Any, tmp: Path, name: str) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank: pickled through `tmp` (a `shared_dir`)."""
        if self.world == 1:
            return [value]
        path = tmp / f"{name}-r{self.rank}.pkl"
        part = path.with_name(f".{path.name}.tmp")
        part.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        part.replace(path)
        self.barrier()
        return [pickle.loads((tmp / f"{name}-r{r}.pkl").read_bytes()) for r in range(self.world)]

    @contextmanager
    def shared_dir(self, path: str | Path | None, prefix: str) -> Iterator[Path]:
        """An empty directory all ranks see, removed afterwards: a private temporary one for one
        process, else `path` (made empty by rank 0 before anyone uses it)."""
        if self.world == 1 and path is None:
            import tempfile

            with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
                yield Path(tmp)
            return
        if path is None:
            raise ValueError("several ranks need a directory they all see for their intermediate files")
        d = Path(path)
        if self.rank == 0:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        self.barrier()
        try:
            yield d
        finally:
            self.barrier()
            if self.rank == 0:
                shutil.rmtree(d, ignore_errors=True)


def save_atomic(path: Path, a: np.ndarray) -> None:
    """np.save through a rename, so a rank that reads `path` never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, a)
    tmp.replace(path)
