"""Selection rules beyond a score cut: MetaCLIP's balancing over concept entries and SemDeDup's
semantic deduplication. Each takes columns of a scoring table and returns a bool keep mask.

Balance (MetaCLIP, Xu et al. 2023): a caption matches an entry of the list when the entry occurs
in it as a run of whole words (case-folded; MetaCLIP matches raw substrings, so "cat" there also
matches "concatenate"). An entry matched by c samples keeps each with probability min(1, t / c),
so head concepts are cut to about t and tail concepts are kept whole; a sample is kept if any of
its entries keeps it, and one that matches no entry is dropped. Matching looks up every word
n-gram (n up to the longest entry) in a hash set: O(words x n) per caption, one pass; the counts
are one integer per entry (500k entries for MetaCLIP's list). Draws are seeded per sample uid.

Score rule per entry (`group_of`): each sample belongs to its rarest matched entry (ties: the
first in the list), unmatched samples to one group of their own, and entries with fewer than
`min_group` samples to one pooled group; the score rule then runs inside each group, so a top
fraction keeps that fraction of every concept and a gmm cut is fit per concept. This calibrates
the cut per concept: on the noise bench, captions of the confusable classes score lower for clean
and wrong pairs alike, and one pool-wide cut keeps the easy concepts' wrong pairs while dropping
the hard concepts' clean ones. Cost: the matching pass of balancing, then one rule per group.

SemDeDup (Abbas et al. 2023): k-means (faiss, spherical) on the unit image embeddings; inside
each cluster, samples sorted by similarity to the centroid, farthest first; a sample is removed
when an earlier one of its cluster has cosine similarity above 1 - eps with it, so one of every
group of near duplicates stays. Memory and time are those of the largest cluster squared:
choose k so clusters stay around 10^4 (SemDeDup used 50,000 clusters for LAION-440M); the
k-means itself trains on a sample (faiss' max_points_per_centroid). The embeddings are streamed
(`semdedup_stream`): a sampling pass, an assignment pass, then one pass spilling each row to the
file of its bucket of clusters (at most max_rows rows in all), each bucket read back once.

Decontamination (as DataComp and the CLIP paper's overlap analysis): a training sample is removed
when its image is a near duplicate of an evaluation image, i.e. its unit image embedding has
cosine similarity >= min_sim with its nearest evaluation embedding (both from one scoring model).
The evaluation embeddings sit in one exact inner-product index (faiss IndexFlatIP: 4 bytes x d per
evaluation image, 100 MB for 50,000 at 512 d) and every training embedding is one nearest-neighbour
query, streamed one scoring shard at a time, so memory is the index plus one shard. Time is
n_train x n_eval x d multiply-adds: 1.4B x 50,000 x 512 is 3.6e16, about ten hours of one
many-core CPU node or minutes on GPUs (faiss-gpu); split the pool's scoring shards over nodes,
or use an IVF index for evaluation sets of millions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlp.data.manifest import DataError, stable_seed
from vlp.data.ranks import Ranks, save_atomic
from vlp.extras import require

_WORD = re.compile(r"[\w][\w'\-]*", re.UNICODE)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def match_entries(captions: Sequence[str], entries: Sequence[str]) -> list[list[int]]:
    """For each caption, the ids of the entries it contains as whole-word runs."""
    index: dict[tuple[str, ...], int] = {}
    for i, e in enumerate(entries):
        w = tuple(_words(e))
        if w:
            index.setdefault(w, i)
    longest = max((len(w) for w in index), default=0)
    out = []
    for text in captions:
        w = _words(text)
        found = {index[g] for n in range(1, longest + 1) for k in range(len(w) - n + 1)
                 if (g := tuple(w[k:k + n])) in index}
        out.append(sorted(found))
    return out


Parts = list[tuple[int, Any]]  # (first row, values of that row and the next ones): this rank's share of a column


def _match_parts(parts: Iterable[tuple[int, Sequence[str]]], entries: Sequence[str]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, entry ids, offsets) per part of captions: row j of a part matches ids[offsets[j]:offsets[j + 1]],
    in ascending order. Numpy arrays, not lists per caption, so a rank holds 4 bytes per match and 8 per row."""
    out = []
    for lo, captions in parts:
        matches = match_entries(captions, entries)
        lens = np.fromiter((len(m) for m in matches), np.int64, len(matches))
        ids = np.fromiter((e for m in matches for e in m), np.int32, int(lens.sum()))
        out.append((lo, ids, np.concatenate([[0], np.cumsum(lens)])))
    return out


def _entry_counts(matched: list[tuple[int, np.ndarray, np.ndarray]], n_entries: int, ranks: Ranks) -> np.ndarray:
    local = np.zeros(n_entries, dtype=np.int64)
    for _, ids, _ in matched:
        local += np.bincount(ids, minlength=n_entries)
    return ranks.sum(local)


def balance_parts(parts: Iterable[tuple[int, Sequence[str]]], uids: np.ndarray, entries: Sequence[str],
                  per_entry: int, seed: int = 0, ranks: Ranks | None = None) -> tuple[Parts, dict[str, Any]]:
    """MetaCLIP balancing of this rank's parts of the caption column (`uids`: every row's uid): the keep
    mask of each part, and the per-entry counts (matched, kept) over all ranks. Counts are summed over
    the ranks before any draw, so the masks do not depend on how the rows are split."""
    if per_entry <= 0:
        raise DataError(f"--per-entry must be positive, got {per_entry}")
    ranks = ranks or Ranks()
    matched = _match_parts(parts, entries)
    counts = _entry_counts(matched, len(entries), ranks)
    out, kept_counts, n_matched = [], np.zeros(len(entries), dtype=np.int64), 0
    for lo, ids, off in matched:
        lens = np.diff(off)
        keep = np.zeros(len(lens), dtype=bool)
        for j in np.flatnonzero(lens):
            m = ids[off[j]:off[j + 1]]
            rng = np.random.default_rng(stable_seed("balance", seed, int(uids[lo + j])))
            keep[j] = bool(np.any(rng.random(len(m)) < per_entry / counts[m]))
        kept_counts += np.bincount(ids[np.repeat(keep, lens)], minlength=len(entries))
        n_matched += int((lens > 0).sum())
        out.append((lo, keep))
    kept_counts = ranks.sum(kept_counts)
    top = np.argsort(-counts, kind="stable")[:20]
    return out, {"per_entry": per_entry, "entries": len(entries),
                 "matched_samples": int(ranks.sum(np.array([n_matched]))[0]), "entries_matched": int((counts > 0).sum()),
                 "head": [{"entry": entries[i], "matched": int(counts[i]), "kept": int(kept_counts[i])} for i in top
                          if counts[i]]}


def balance_keep(captions: Sequence[str], uids: np.ndarray, entries: Sequence[str], per_entry: int,
                 seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """MetaCLIP balancing of captions held in memory: keep mask and per-entry counts (matched, kept)."""
    parts, info = balance_parts([(0, captions)], uids, entries, per_entry, seed)
    return parts[0][1], info


def group_parts(parts: Iterable[tuple[int, Sequence[str]]], entries: Sequence[str], min_group: int = 100,
                ranks: Ranks | None = None) -> tuple[Parts, list[str]]:
    """Group id per row of this rank's parts of the caption column (its rarest matched entry over all
    ranks' counts) and the groups' names; groups smaller than `min_group` over all ranks are pooled into
    one ("<small entries>"), unmatched captions form "<no entry>"."""
    ranks = ranks or Ranks()
    matched = _match_parts(parts, entries)
    counts = _entry_counts(matched, len(entries), ranks)
    groups, sizes = [], np.zeros(len(entries), dtype=np.int64)
    for lo, ids, off in matched:
        group = np.full(len(off) - 1, -1, dtype=np.int64)
        for j in np.flatnonzero(np.diff(off)):
            m = ids[off[j]:off[j + 1]]
            group[j] = m[np.lexsort((m, counts[m]))[0]]  # the rarest; ties: the first in the list
        sizes += np.bincount(group[group >= 0], minlength=len(entries))
        groups.append((lo, group))
    sizes = ranks.sum(sizes)
    for _, group in groups:
        group[(group >= 0) & (sizes[np.maximum(group, 0)] < min_group)] = len(entries)
        group[group < 0] = len(entries) + 1
    return groups, [*entries, "<small entries>", "<no entry>"]


def group_of(captions: Sequence[str], entries: Sequence[str], min_group: int = 100) -> tuple[np.ndarray, list[str]]:
    """`group_parts` of captions held in memory."""
    parts, names = group_parts([(0, captions)], entries, min_group)
    return parts[0][1], names


def semdedup_keep(emb: np.ndarray, eps: float, clusters: int, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """SemDeDup keep mask over unit embeddings `emb` [n, d] held in memory."""
    return semdedup_stream([lambda: emb], [len(emb)], eps, clusters, seed)


def semdedup_stream(shards: Sequence[Callable[[], np.ndarray]], sizes: Sequence[int], eps: float, clusters: int,
                    seed: int = 0, max_rows: int = 4_000_000, ranks: Ranks | None = None,
                    spill_dir: str | Path | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """SemDeDup over embeddings too large to hold: `shards[i]()` loads scoring shard i's rows (sizes[i]
    of them), one shard at a time. Pass 1 draws the k-means training sample (about 256 rows per
    centroid, seeded per shard), pass 2 assigns each row to its centroid (8 bytes per row kept); clusters
    are grouped into buckets of at most `max_rows` rows (and at most n / ranks rows, so every rank gets
    work), pass 3 writes each row to its bucket's spill file (in the rows' own dtype) and each bucket is
    read back once and deduplicated. Under several `ranks` each pass covers that rank's shards (i mod
    world), each bucket is deduplicated by one rank, and the files go through `spill_dir`, which every
    rank must see; the mask does not depend on the number of ranks. Memory per rank: max_rows
    embeddings (or the largest cluster) and 8 bytes per row of its shards; I/O: three reads of the
    column and one write of it in all."""
    ranks = ranks or Ranks()
    n = int(sum(sizes))
    if n == 0:
        return np.zeros(0, dtype=bool), {"eps": eps, "clusters": 0, "largest_cluster": 0, "removed": 0, "buckets": 0}
    k = max(1, min(int(clusters), n))
    lo = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    filled = [i for i, size in enumerate(sizes) if size]  # a shard whose samples were all skipped has no rows
    mine = [i for i in filled if ranks.mine(i)]
    with ranks.shared_dir(spill_dir, "vlp-semdedup-") as tmp:
        index = _centroids(shards, mine, filled, n, k, seed, ranks, tmp)
        own = {}
        for i in mine:
            sim, a = index.search(_unit(shards[i]()), 1)
            own[i] = (a.ravel().astype(np.int64), sim.ravel())
        assigned = [a for a, _ in own.values()]
        csize = ranks.sum(np.bincount(np.concatenate(assigned), minlength=k) if assigned else np.zeros(k))
        cap = max(min(int(max_rows), -(-n // ranks.world)), 1)
        bucket = (np.cumsum(csize) - csize) // cap  # clusters grouped by where they start
        removed = [_dedup(*b, eps) for b in _buckets(shards, own, lo, csize, bucket, ranks, tmp, index.d)]
        removed = _rows(x for part in ranks.gather(removed, tmp, "removed") for x in part)
    keep = np.ones(n, dtype=bool)
    keep[removed] = False
    return keep, {"eps": eps, "clusters": k, "largest_cluster": int(csize.max(initial=0)),
                  "removed": int((~keep).sum()), "buckets": len(np.unique(bucket[csize > 1]))}


def _centroids(shards: Sequence[Callable[[], np.ndarray]], mine: list[int], filled: list[int], n: int, k: int,
               seed: int, ranks: Ranks, tmp: Path) -> Any:
    """Spherical k-means (faiss, on rank 0) on a sample drawn from every shard; an inner-product index
    of the centroids on every rank."""
    faiss = require("faiss", "SemDeDup (vlp.curate select --dedup-eps)")
    rate = min(1.0, 256 * k / max(n, 1))

    def draw(i: int) -> np.ndarray:
        c = _unit(shards[i]())
        return c if rate >= 1 else c[np.random.default_rng([seed, i]).random(len(c)) < rate]

    if ranks.world == 1:
        sample = [draw(i) for i in mine]
    else:
        for i in mine:
            save_atomic(tmp / f"sample-{i}.npy", draw(i))
        ranks.barrier()
        sample = [np.load(tmp / f"sample-{i}.npy") for i in filled] if ranks.rank == 0 else []
    if ranks.rank == 0:
        sample = np.concatenate(sample)
        km = faiss.Kmeans(sample.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
        km.train(sample)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
        if ranks.world > 1:
            save_atomic(tmp / "centroids.npy", centroids)
    ranks.barrier()
    if ranks.rank != 0:
        centroids = np.load(tmp / "centroids.npy")
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    return index


_SPILLED = (("rows", np.int64), ("cluster", np.int64), ("sim", np.float32), ("emb", None))  # None: as given


def _buckets(shards: Sequence[Callable[[], np.ndarray]], own: dict[int, tuple[np.ndarray, np.ndarray]],
             lo: np.ndarray, csize: np.ndarray, bucket: np.ndarray, ranks: Ranks, tmp: Path,
             d: int) -> Iterator[tuple[np.ndarray, ...]]:
    """(row numbers, unit embeddings, cluster, cosine to the centroid) of the rows in clusters of more
    than one, per bucket this rank deduplicates, in row order: gathered in memory when one process
    has one bucket, else spilled by every rank to one file per bucket and read back by its owner."""
    ids = np.unique(bucket[csize > 1])

    def wanted(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, sim = own[i]
        w = np.flatnonzero(csize[a] > 1)
        return w, a[w], sim[w]

    if ranks.world == 1 and len(ids) <= 1:
        parts = [(lo[i] + w, _unit(shards[i]())[w], a, s) for i in sorted(own) for w, a, s in [wanted(i)] if len(w)]
        if parts:
            yield tuple(np.concatenate(x) for x in zip(*parts))
        return
    for i in sorted(own):
        w, a, s = wanted(i)
        c = shards[i]() if len(w) else None
        for b in np.unique(bucket[a]):
            m = bucket[a] == b
            for (field, dtype), x in zip(_SPILLED, (lo[i] + w[m], a[m], s[m], c[w[m]])):
                with open(tmp / f"b{b}-r{ranks.rank}.{field}", "ab") as f:
                    f.write(np.ascontiguousarray(x, dtype=dtype).tobytes())
    ranks.barrier()
    for b in ids[ids % ranks.world == ranks.rank]:
        got = [_read_spill(tmp / f"b{b}-r{r}", d) for r in range(ranks.world) if (tmp / f"b{b}-r{r}.rows").exists()]
        rows, cl, sim, emb = (np.concatenate(x) for x in zip(*got))
        order = np.argsort(rows, kind="stable")
        yield rows[order], _unit(emb[order]), cl[order], sim[order]


def _read_spill(stem: Path, d: int) -> list[np.ndarray]:
    rows, cl, sim = (np.fromfile(f"{stem}.{field}", dtype) for field, dtype in _SPILLED[:3])
    emb = np.fromfile(f"{stem}.emb", np.uint8)  # the embeddings' own dtype: 2 or 4 bytes per value
    dtype = {2: np.float16, 4: np.float32}[len(emb) // max(len(rows) * d, 1)] if len(rows) else np.float32
    return [rows, cl, sim, emb.view(dtype).reshape(len(rows), d)]


def _dedup(rows: np.ndarray, emb: np.ndarray, cl: np.ndarray, sim: np.ndarray, eps: float) -> np.ndarray:
    """The rows removed: per cluster, sorted farthest from the centroid first (ties in row order), a row
    whose cosine with an earlier one is above 1 - eps."""
    order = np.lexsort((sim, cl))
    starts = np.flatnonzero(np.r_[True, np.diff(cl[order]) != 0])
    out = []
    for at in np.split(order, starts[1:]):
        earlier = np.triu(emb[at] @ emb[at].T, k=1)  # [a, b]: a before b
        out.append(rows[at][earlier.max(axis=0) > 1.0 - eps])
    return _rows(out)


def _rows(parts: Iterable[np.ndarray]) -> np.ndarray:
    """Row numbers of several parts as one int64 array (empty when there are none)."""
    return np.concatenate([np.zeros(0, np.int64), *parts]).astype(np.int64, copy=False)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_decontaminate(min_sim: float, max_removed: float) -> None:
    """Refuse a decontamination cut or removal limit out of range (called before any work)."""
    if not (-1.0 <= min_sim <= 1.0 and 0.0 <= max_removed <= 1.0):
        raise DataError(f"--decontaminate-min-sim {min_sim} must be a cosine in [-1, 1] and "
                        f"--decontaminate-max-removed {max_removed} a share in [0, 1]")


def decontaminate_keep(chunks: Iterable[tuple[int, np.ndarray, Sequence[str]]], n: int, eval_emb: np.ndarray,
                       eval_keys: Sequence[str], min_sim: float, max_removed: float = 0.05, examples: int = 20,
                       ranks: Ranks | None = None, spill_dir: str | Path | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Keep mask over the n training samples: False where the nearest of `eval_emb` has cosine >= min_sim.
    `chunks` holds (first row, image embeddings, keys) of this rank's scoring shards (every shard for one
    process); under several `ranks` each streams its own and the removed rows meet through `spill_dir`.
    The report lists the closest pairs found (training key, evaluation key, cosine). Refused when more
    than `max_removed` of the pool would go: then the embeddings do not tell copies from look-alikes."""
    faiss = require("faiss", "decontamination (vlp.curate select --decontaminate)")
    check_decontaminate(min_sim, max_removed)
    if not len(eval_emb):
        raise DataError("decontamination: the evaluation scores hold no image embeddings")
    ranks = ranks or Ranks()
    ev = _unit(eval_emb)
    index = faiss.IndexFlatIP(ev.shape[1])
    index.add(ev)
    removed, found = [], []
    for lo, emb, keys in chunks:
        if emb.shape[1] != ev.shape[1]:
            raise DataError(f"decontamination: training embeddings have {emb.shape[1]} dimensions, the "
                            f"evaluation ones {ev.shape[1]}: score both with the same checkpoint")
        sim, nearest = index.search(_unit(emb), 1)
        hit = np.flatnonzero(sim.ravel() >= min_sim)
        removed.append(lo + hit)
        found += [(float(sim[i, 0]), keys[i], eval_keys[nearest[i, 0]]) for i in hit]
    with ranks.shared_dir(spill_dir, "vlp-decontaminate-") as tmp:
        parts = ranks.gather((removed, sorted(found, key=_closest)[:examples]), tmp, "decontaminated")
    keep = np.ones(n, dtype=bool)
    keep[_rows(r for rows, _ in parts for r in rows)] = False
    if (~keep).sum() > max_removed * n:
        raise DataError(f"decontamination at cosine >= {min_sim} would remove {(~keep).mean():.1%} of the pool "
                        f"(more than --decontaminate-max-removed {max_removed:.0%}): these image embeddings do "
                        "not separate copies of evaluation images from look-alikes; raise the cut, score with a "
                        "model of more diverse data, or raise the limit if the pool really is contaminated")
    found = sorted((f for _, fs in parts for f in fs), key=_closest)
    return keep, {"min_sim": min_sim, "eval_images": int(len(ev)), "removed": int((~keep).sum()),
                  "closest": [{"key": k, "eval_key": e, "cosine": round(c, 5)} for c, k, e in found[:examples]]}


def _closest(found: tuple[float, str, str]) -> tuple[float, str]:
    return -found[0], found[1]  # the highest cosine first, ties by training key: the same on any number of ranks
