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
from typing import Any

import numpy as np

from vlp.data.manifest import DataError, stable_seed
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


def balance_keep(captions: Sequence[str], uids: np.ndarray, entries: Sequence[str], per_entry: int,
                 seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """MetaCLIP balancing: keep mask and per-entry counts (matched, kept)."""
    if per_entry <= 0:
        raise DataError(f"--per-entry must be positive, got {per_entry}")
    matches = match_entries(captions, entries)
    counts = np.bincount([e for m in matches for e in m], minlength=len(entries))
    keep = np.zeros(len(captions), dtype=bool)
    for i, m in enumerate(matches):
        if m:
            rng = np.random.default_rng(stable_seed("balance", seed, int(uids[i])))
            draws = rng.random(len(m))
            keep[i] = bool(np.any(draws < per_entry / counts[m]))
    kept_counts = np.bincount([e for i, m in enumerate(matches) if keep[i] for e in m], minlength=len(entries))
    top = np.argsort(-counts)[:20]
    return keep, {"per_entry": per_entry, "entries": len(entries), "matched_samples": int(sum(bool(m) for m in matches)),
                  "entries_matched": int((counts > 0).sum()),
                  "head": [{"entry": entries[i], "matched": int(counts[i]), "kept": int(kept_counts[i])} for i in top
                           if counts[i]]}


def group_of(captions: Sequence[str], entries: Sequence[str], min_group: int = 100) -> tuple[np.ndarray, list[str]]:
    """Group id per caption (its rarest matched entry) and the groups' names; groups smaller than
    `min_group` are pooled into one ("<small entries>"), unmatched captions form "<no entry>"."""
    matches = match_entries(captions, entries)
    counts = np.bincount([e for m in matches for e in m], minlength=len(entries))
    group = np.array([min(m, key=lambda e: (counts[e], e)) if m else -1 for m in matches], dtype=np.int64)
    sizes = np.bincount(group[group >= 0], minlength=len(entries))
    small = (group >= 0) & (sizes[np.maximum(group, 0)] < min_group)
    group[small] = len(entries)
    group[group < 0] = len(entries) + 1
    return group, [*entries, "<small entries>", "<no entry>"]


def semdedup_keep(emb: np.ndarray, eps: float, clusters: int, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """SemDeDup keep mask over unit embeddings `emb` [n, d] held in memory."""
    return semdedup_stream(lambda: iter([emb]), len(emb), eps, clusters, seed)


def semdedup_stream(chunks: Callable[[], Iterable[np.ndarray]], n: int, eps: float, clusters: int, seed: int = 0,
                    max_rows: int = 4_000_000) -> tuple[np.ndarray, dict[str, Any]]:
    """SemDeDup over embeddings too large to hold: `chunks()` yields the n rows again (one scoring shard
    at a time) on every call. Pass 1 draws the k-means training sample (every row up to 256 per
    centroid, faiss' own cap), pass 2 assigns each row to its centroid (8 bytes per row kept); clusters
    are then grouped into buckets of at most `max_rows` rows in all, pass 3 writes each row to its
    bucket's spill file (in the rows' own dtype, in a temporary directory) and each bucket is read back once and
    deduplicated. Memory: max_rows embeddings (or the largest cluster); I/O: three reads of the
    column and one write of it."""
    if n == 0:
        return np.zeros(0, dtype=bool), {"eps": eps, "clusters": 0, "largest_cluster": 0, "removed": 0, "buckets": 0}
    k = max(1, min(int(clusters), n))
    assign, to_centroid = _kmeans_assign(chunks, n, k, seed)
    sizes = np.bincount(assign, minlength=k)
    bucket = np.cumsum(sizes) // max(int(max_rows), 1)  # clusters grouped by cumulative size
    keep = np.ones(n, dtype=bool)
    buckets = 0
    for rows, emb in _buckets(chunks, bucket[assign], sizes[assign] > 1):
        buckets += 1
        for c in np.unique(assign[rows]):
            at = np.flatnonzero(assign[rows] == c)
            at = at[np.argsort(to_centroid[rows[at]], kind="stable")]  # farthest from the centroid first
            earlier = np.triu(emb[at] @ emb[at].T, k=1)  # [a, b]: a before b
            keep[rows[at]] = ~(earlier.max(axis=0) > 1.0 - eps)
    return keep, {"eps": eps, "clusters": k, "largest_cluster": int(sizes.max(initial=0)),
                  "removed": int((~keep).sum()), "buckets": buckets}


def _kmeans_assign(chunks: Callable[[], Iterable[np.ndarray]], n: int, k: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means on a sample of the rows, then each row's centroid and cosine to it."""
    faiss = require("faiss", "SemDeDup (vlp.curate select --dedup-eps)")
    rate = min(1.0, 256 * k / max(n, 1))
    rng = np.random.default_rng(seed)
    sample = [c[rng.random(len(c)) < rate] if rate < 1 else c for c in map(_unit, chunks())]
    km = faiss.Kmeans(sample[0].shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
    km.train(np.concatenate(sample))
    del sample
    assign, to_centroid = np.empty(n, np.int32), np.empty(n, np.float32)
    lo = 0
    for c in map(_unit, chunks()):
        sim, a = km.index.search(c, 1)
        assign[lo:lo + len(c)], to_centroid[lo:lo + len(c)] = a.ravel(), sim.ravel()
        lo += len(c)
    return assign, to_centroid


def _buckets(chunks: Callable[[], Iterable[np.ndarray]], bucket: np.ndarray,
             wanted: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row numbers, unit embeddings) of each bucket's wanted rows: gathered in memory when there is
    one bucket, else spilled per bucket in one pass and read back one bucket at a time."""
    import tempfile

    ids = np.unique(bucket[wanted])
    if len(ids) <= 1:
        rows = np.flatnonzero(wanted)
        if len(rows):
            yield rows, np.concatenate([_unit(c)[wanted[lo:lo + len(c)]] for lo, c in _offsets(chunks())])
        return
    with tempfile.TemporaryDirectory(prefix="vlp-semdedup-") as tmp:
        d, dtype = 0, np.float16
        for lo, c in _offsets(chunks()):
            d, dtype = c.shape[1], c.dtype  # spilled as given: the scores' fp16 columns stay fp16
            part = np.flatnonzero(wanted[lo:lo + len(c)])
            for b in np.unique(bucket[lo + part]):
                mine = part[bucket[lo + part] == b]
                with open(f"{tmp}/{b}.emb", "ab") as f:
                    f.write(np.ascontiguousarray(c[mine]).tobytes())
                with open(f"{tmp}/{b}.rows", "ab") as f:
                    f.write((lo + mine).astype(np.int64).tobytes())
        for b in ids:
            yield (np.fromfile(f"{tmp}/{b}.rows", np.int64),
                   _unit(np.fromfile(f"{tmp}/{b}.emb", dtype).reshape(-1, d)))


def _offsets(chunks: Iterable[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    lo = 0
    for c in chunks:
        yield lo, c
        lo += len(c)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_decontaminate(min_sim: float, max_removed: float) -> None:
    """Refuse a decontamination cut or removal limit out of range (called before any work)."""
    if not (-1.0 <= min_sim <= 1.0 and 0.0 <= max_removed <= 1.0):
        raise DataError(f"--decontaminate-min-sim {min_sim} must be a cosine in [-1, 1] and "
                        f"--decontaminate-max-removed {max_removed} a share in [0, 1]")


def decontaminate_keep(chunks: Iterable[tuple[np.ndarray, Sequence[str]]], eval_emb: np.ndarray,
                       eval_keys: Sequence[str], min_sim: float, max_removed: float = 0.05,
                       examples: int = 20) -> tuple[np.ndarray, dict[str, Any]]:
    """Keep mask over the training samples of `chunks` ((image embeddings, keys) per scoring shard, in
    uid order): False where the nearest of `eval_emb` has cosine >= min_sim. The report lists the
    closest pairs found (training key, evaluation key, cosine). Refused when more than `max_removed`
    of the pool would go: then the embeddings do not tell copies from look-alikes at this cut."""
    faiss = require("faiss", "decontamination (vlp.curate select --decontaminate)")
    check_decontaminate(min_sim, max_removed)
    if not len(eval_emb):
        raise DataError("decontamination: the evaluation scores hold no image embeddings")
    ev = _unit(eval_emb)
    index = faiss.IndexFlatIP(ev.shape[1])
    index.add(ev)
    keeps, found = [], []
    for emb, keys in chunks:
        if emb.shape[1] != ev.shape[1]:
            raise DataError(f"decontamination: training embeddings have {emb.shape[1]} dimensions, the "
                            f"evaluation ones {ev.shape[1]}: score both with the same checkpoint")
        sim, nearest = index.search(_unit(emb), 1)
        sim, nearest = sim.ravel(), nearest.ravel()
        hit = sim >= min_sim
        keeps.append(~hit)
        found += [(float(sim[i]), keys[i], eval_keys[nearest[i]]) for i in np.flatnonzero(hit)]
    keep = np.concatenate(keeps) if keeps else np.zeros(0, dtype=bool)
    if (~keep).sum() > max_removed * len(keep):
        raise DataError(f"decontamination at cosine >= {min_sim} would remove {(~keep).mean():.1%} of the pool "
                        f"(more than --decontaminate-max-removed {max_removed:.0%}): these image embeddings do "
                        "not separate copies of evaluation images from look-alikes; raise the cut, score with a "
                        "model of more diverse data, or raise the limit if the pool really is contaminated")
    found.sort(key=lambda f: -f[0])
    return keep, {"min_sim": min_sim, "eval_images": int(len(ev)), "removed": int((~keep).sum()),
                  "closest": [{"key": k, "eval_key": e, "cosine": round(c, 5)} for c, k, e in found[:examples]]}
