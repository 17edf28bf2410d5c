"""Selection filters: the rules `vlp.curate select` applies beside the score cut, one module each.

A filter names its options (they become `select` keywords and `--dashed-flags`), says when it is on,
checks its inputs before any work, and returns a keep mask over the scored rows. A sample is kept
when the score rule and every active filter keep it. A new filter is one module here plus its line
in `registry._BUILTIN` (or `register_filter` from user code before `select` runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from vlp.data.manifest import DataError
from vlp.data.ranks import Ranks


@dataclass(frozen=True)
class Option:
    """One option of a filter: `select(..., name=...)` and `--name-with-dashes` on the command line."""

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    action: str | None = None  # argparse action ("append": repeatable)
    metavar: str | None = None


@dataclass
class Context:
    """What a filter reads: the scoring run's table (its uid and score columns, held whole), its directory
    and meta, the uid of each row, and the run's seed; under torchrun, this process's ranks and a
    directory every rank sees for intermediate files (the output directory). Other columns (captions,
    caption statistics, embeddings) are read one scoring shard at a time, each rank its own shards
    (`my_column`), and per-row results meet again through `assemble`."""

    table: Any
    scores_dir: str | Path
    meta: dict[str, Any]
    uid: np.ndarray
    seed: int
    ranks: Ranks = field(default_factory=Ranks)
    work_dir: Path | None = None

    def shared(self, name: str) -> Path | None:
        """The directory `name` inside work_dir for a filter's files between ranks; None for one process
        (the filter then uses a private temporary directory)."""
        return self.work_dir / name if self.work_dir is not None and self.ranks.world > 1 else None

    @cached_property
    def files(self) -> list[tuple[Path, int]]:
        """The scoring shard files in uid order with their row counts, read from the Parquet footers once
        for every filter of the run (vlp.curate.score.score_files)."""
        from vlp.curate.score import score_files

        return score_files(self.scores_dir)

    def my_column(self, name: str) -> Iterator[tuple[int, Any]]:
        """(first row, the column `name` of that scoring shard) for each of this rank's scoring shards
        (i mod world), one shard at a time: a column too large to hold whole (captions, keys) is read
        in parts, split over the ranks."""
        import pyarrow.parquet as pq

        lo = 0
        for i, (f, n) in enumerate(self.files):
            if n and self.ranks.mine(i):
                yield lo, pq.read_table(f, columns=[name])[name]
            lo += n

    def my_captions(self) -> Iterator[tuple[int, list[str]]]:
        return ((lo, col.to_pylist()) for lo, col in self.my_column("caption"))

    def assemble(self, parts: list[tuple[int, np.ndarray]], name: str, dtype: Any = bool) -> np.ndarray:
        """One value per row of the table from every rank's parts (first row, values): exchanged as files
        through `shared(name)` under several ranks."""
        with self.ranks.shared_dir(self.shared(name), f"vlp-{name}-") as tmp:
            every = [p for rank_parts in self.ranks.gather(parts, tmp, name) for p in rank_parts]
        out = np.zeros(len(self.uid), dtype=dtype)
        for lo, values in every:
            out[lo:lo + len(values)] = values
        return out


class Filter:
    """Subclass with `name`, `options`, `active` and `keep` (and `check` for inputs to refuse early)."""

    name: str = ""
    options: tuple[Option, ...] = ()

    def active(self, o: dict[str, Any]) -> bool:
        raise NotImplementedError

    def check(self, o: dict[str, Any], scores_dir: str | Path) -> None:
        """Refuse bad options or inputs before the scores are read (default: nothing to check)."""

    def keep(self, ctx: Context, o: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any] | None]:
        """bool per row of ctx.table, and what the filter found (for report.json; None: nothing)."""
        raise NotImplementedError


def entries(path: str | Path) -> list[str]:
    """An entry list: one entry per line, blank lines and # comments skipped."""
    try:
        return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError as e:
        raise DataError(f"cannot read the entry list '{path}': {e}") from None


def matrix(column: Any, dtype: Any = np.float32) -> np.ndarray:
    col = column.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(dtype, copy=False)


def check_embeddings(scores_dir: str | Path, role: str, model: str | None = None) -> str:
    """The scoring model of a finished run made with --embeddings (and by `model`, if named)."""
    from vlp.curate.score import scoring_meta

    meta, _ = scoring_meta(scores_dir)
    if not meta.get("embeddings"):
        raise DataError(f"{role} '{scores_dir}' was scored without --embeddings; score it again with them")
    if model is not None and meta["model"] != model:
        raise DataError(f"{role} '{scores_dir}' was scored by model {meta['model']}, the pool by {model}: "
                        "near duplicates are only comparable in one model's embedding space")
    return meta["model"]


def image_embeddings(scores_dir: str | Path, dtype: Any = np.float32, only: Callable[[int], bool] | None = None,
                     rows: bool = False) -> Iterator[tuple]:
    """(image embeddings, keys) per scoring shard, in uid order: never the whole column at once. `only`:
    the shards (by number) to read; `rows`: (first row, embeddings, keys) instead."""
    import pyarrow.parquet as pq

    from vlp.curate.score import score_files

    lo = 0
    for i, (f, n) in enumerate(score_files(scores_dir)):
        if n and (only is None or only(i)):
            t = pq.read_table(f, columns=["key", "image_emb"])
            emb, keys = matrix(t["image_emb"], dtype), t["key"].to_pylist()
            yield (lo, emb, keys) if rows else (emb, keys)
        lo += n


def embedding_shards(scores_dir: str | Path, dtype: Any = np.float32) -> tuple[list[Callable[[], np.ndarray]], list[int]]:
    """A loader of each scoring shard's image embeddings, in uid order, and each shard's row count (from
    the Parquet footers: nothing is read until a loader is called)."""
    import pyarrow.parquet as pq

    from vlp.curate.score import score_files

    files = score_files(scores_dir)

    def loader(f: Any) -> Callable[[], np.ndarray]:
        return lambda: matrix(pq.read_table(f, columns=["image_emb"])["image_emb"], dtype)

    return [loader(f) for f, _ in files], [n for _, n in files]
