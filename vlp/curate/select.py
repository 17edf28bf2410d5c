"""Choose the samples to train on from a scoring run's table, and write a selection the loader reads
in place (vlp/data/selection.py).

    python -m vlp.curate select SCORES OUT --rule gmm                 (clean / noisy split of the scores)
    python -m vlp.curate select SCORES OUT --rule top --fraction 0.3  (DataComp's CLIP-score top 30 %)
    python -m vlp.curate select SCORES OUT --rule threshold --min-score 0.28   (LAION's cut)
      [--min-caption-words 2] [--balance entries.txt --per-entry 20000] [--dedup-eps 0.05 --dedup-clusters 1000]
      [--decontaminate EVAL_SCORES --decontaminate-min-sim 0.95]

Rules:
- `threshold`: keep score >= min-score (LAION-5B kept ViT-B/32 cosine >= 0.28).
- `top`: keep the `fraction` of highest scores, over the whole pool (DataComp's CLIP-score filter).
- `gmm`: fit a two-component Gaussian mixture to the scores and keep the samples more likely under
  the higher component than the lower one (posterior >= min-posterior): the clean / noisy split
  of noisy-correspondence training (DivideMix, NCR fit it to per-sample losses), which needs no
  guess of the noise rate. The fit uses at most 1M scores drawn at random.
- `--per-entry-rule ENTRIES`: the score rule runs inside each entry's group of captions (each
  sample in its rarest matched entry; vlp/curate/rules.py), so the cut is calibrated per concept.
- Filters (vlp/curate/filters, one module each, registered): `--min-caption-words`, `--balance`,
  `--dedup-eps`, `--decontaminate`: caption length, MetaCLIP's balancing, SemDeDup and removal of
  near duplicates of evaluation images (vlp/curate/rules.py), combined with the score rule
  (`--rule none` for none): a sample is kept when every rule keeps it.
- `--weights` (gmm): instead of a hard cut, each kept sample gets its clean posterior as weight,
  the probability that it is in an epoch (NCR and DivideMix weigh pairs by this posterior); with
  `--min-posterior 0.05` the doubtful pairs stay, seen less often.
A sample without a score (the trainer would have dropped it) is never kept.

Under torchrun (`torchrun --nproc_per_node=N -m vlp.curate select ...`) the caption filters, the
per-entry rule's matching, SemDeDup and decontamination split their passes over the ranks by scoring
shard and exchange files through OUT (which every rank must see); the selection equals one
process's, and rank 0 writes it.

Writes OUT/mask.npy and OUT/selection.json (read by training), OUT/selection.parquet (uid, key of
every kept sample) and OUT/report.json (counts per rule, score histograms of kept and dropped).
At a billion samples: the uid and score columns, the only ones held whole, are 12 bytes per sample
(17 GB for 1.4B) and the score rules are one vectorized pass over them (top: a partition for the
quantile; gmm: a fit on 1M samples, then a closed-form posterior per row); captions and keys are
read one scoring shard at a time; the mask is 1 bit per sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from vlp.curate.filters import Context, filter_defaults, filters
from vlp.curate.filters.base import entries
from vlp.data.manifest import DataError
from vlp.data.ranks import Ranks
from vlp.data.selection import read_meta, write_selection
from vlp.extras import MissingExtraError, require

RULES = ("threshold", "top", "gmm")
GMM_FIT_MAX = 1_000_000


def gmm_keep(scores: np.ndarray, min_posterior: float = 0.5,
             seed: int = 0) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """Samples whose posterior under the higher-mean of two Gaussians is >= min_posterior; what the
    fit found; and the posteriors (a weighted selection's weights)."""
    post, info = gmm_posterior(scores, seed)
    return post >= min_posterior, info, post


def gmm_posterior(scores: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Each score's posterior under the higher-mean of two Gaussians fitted to (at most 1M of) them."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    fit = scores if len(scores) <= GMM_FIT_MAX else rng.choice(scores, GMM_FIT_MAX, replace=False)
    gm = GaussianMixture(2, random_state=seed, tol=1e-5, max_iter=500).fit(fit.reshape(-1, 1).astype(np.float64))
    hi = int(np.argmax(gm.means_.ravel()))
    post = np.empty(len(scores), dtype=np.float64)
    for lo in range(0, len(scores), GMM_FIT_MAX):  # in chunks: sklearn's temporaries are several [n, 2] arrays
        post[lo:lo + GMM_FIT_MAX] = gm.predict_proba(scores[lo:lo + GMM_FIT_MAX].reshape(-1, 1).astype(np.float64))[:, hi]
    info = {"means": gm.means_.ravel().tolist(), "stds": np.sqrt(gm.covariances_.ravel()).tolist(),
            "weights": gm.weights_.tolist(), "clean_component": hi}
    return post, info


def rule_keep(scores: np.ndarray, rule: str, *, fraction: float = 0.3, min_score: float = 0.0,
              min_posterior: float = 0.5, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """bool per scored sample for one rule, and what the rule found (its cut)."""
    if rule == "threshold":
        return scores >= min_score, {"min_score": min_score}
    if rule == "top":
        if not 0.0 < fraction <= 1.0:
            raise DataError(f"--fraction must be in (0, 1], got {fraction}")
        k = max(1, int(round(fraction * len(scores))))
        cut = float(np.partition(scores, len(scores) - k)[len(scores) - k]) if len(scores) else 0.0
        return scores >= cut, {"fraction": fraction, "cut": cut}
    if rule == "gmm":
        keep, info, _ = gmm_keep(scores, min_posterior, seed)
        return keep, info
    raise DataError(f"unknown selection rule '{rule}' (known: {', '.join(RULES)})")


def grouped_rule_keep(scores: np.ndarray, group: np.ndarray, names: list[str], rule: str,
                      **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """`rule_keep` inside each group; what each rule found, for the 20 largest groups."""
    keep = np.zeros(len(scores), dtype=bool)
    found = {}
    order = np.argsort(group, kind="stable")  # one sort, then each group's members are one slice
    ids, starts, sizes = np.unique(group[order], return_index=True, return_counts=True)
    for g, start, n in sorted(zip(ids.tolist(), starts.tolist(), sizes.tolist()), key=lambda x: -x[2]):
        members = order[start:start + n]
        keep[members], info = rule_keep(scores[members], rule, **kw)
        if len(found) < 20:
            found[names[g]] = {"samples": n, "kept": int(keep[members].sum()), **info}
    return keep, {"groups": len(ids), "largest": found}


def _histogram(scores: np.ndarray, keep: np.ndarray, bins: int = 40) -> dict[str, Any]:
    if not len(scores):
        return {"edges": [], "kept": [], "dropped": []}
    edges = np.linspace(float(scores.min()), float(scores.max()) + 1e-6, bins + 1)
    return {"edges": edges.round(5).tolist(), "kept": np.histogram(scores[keep], edges)[0].tolist(),
            "dropped": np.histogram(scores[~keep], edges)[0].tolist()}


def _score_rule(ctx: Context, scores: np.ndarray, rule: str, found: dict[str, Any], per_entry_rule: Any,
                min_group: int, weights: bool, rule_kw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """The score rule's keep mask (what it found goes to `found`), and the clean posteriors with `weights`."""
    from vlp.curate.rules import group_parts

    if rule == "none":
        return np.ones(len(scores), dtype=bool), None
    if per_entry_rule:  # each rank groups its shards' captions; the rule then runs on the whole score column
        parts, names = group_parts(ctx.my_captions(), entries(per_entry_rule), min_group, ctx.ranks)
        group = ctx.assemble(parts, "groups", np.int64)
        keep, found[rule] = grouped_rule_keep(scores, group, names, rule, **rule_kw)
        return keep, None
    if weights:  # the weight of a kept sample is its clean posterior
        keep, found[rule], post = gmm_keep(scores, rule_kw["min_posterior"], rule_kw["seed"])
        return keep, post
    keep, found[rule] = rule_keep(scores, rule, **rule_kw)
    return keep, None


def select(scores_dir: str | Path, out_dir: str | Path, rule: str, *, fraction: float = 0.3,
           min_score: float = 0.0, min_posterior: float = 0.5, per_entry_rule: str | Path | None = None,
           min_group: int = 100, weights: bool = False, seed: int = 0, ranks: Ranks | None = None,
           **filter_options: Any) -> dict[str, Any]:
    """Apply `rule` ("none": no score cut) and every active filter (vlp.curate.filters: caption length,
    MetaCLIP balancing, SemDeDup, decontamination, ...; `filter_options` are their options) to a finished
    scoring run; a sample is kept if all of them keep it. `weights` (gmm): each kept sample is in an
    epoch with probability its clean posterior (a weighted selection, vlp.data.selection). Under
    several `ranks` (torchrun) every rank calls this, the filters that split work over ranks do so,
    and rank 0 writes the selection."""
    if per_entry_rule and rule == "none":
        raise ValueError(f"--per-entry-rule {per_entry_rule}: there is no score rule to apply per entry "
                         "(--rule none); name one (gmm, top, threshold) or drop --per-entry-rule")
    if weights and (rule != "gmm" or per_entry_rule):
        raise ValueError(f"--weights: the weights are the gmm rule's clean posteriors over the whole pool; "
                         f"{'--per-entry-rule' if per_entry_rule else f'--rule {rule}'} has none")
    known = filter_defaults()
    unknown = sorted(set(filter_options) - set(known))
    if unknown:
        raise ValueError(f"select: unknown option {unknown[0]} (filter options: {', '.join(known)})")
    o = {**known, **filter_options}
    active = [f for f in filters() if f.active(o)]
    for f in active:  # refused before any work
        f.check(o, scores_dir)
    from vlp.curate.score import read_scores

    require("pyarrow.parquet", "vlp.curate select")
    import pyarrow as pa

    try:  # only uid and score are read whole: captions, keys and embeddings are read per shard where needed
        table, meta = read_scores(scores_dir, ["uid", "score"])
    except (KeyError, pa.ArrowInvalid) as e:
        raise DataError(f"'{scores_dir}' lacks a column these rules need ({e})") from None
    uid = table["uid"].to_numpy()
    scores = table["score"].to_numpy().astype(np.float32)
    table = pa.table({"uid": uid, "score": scores})  # the same columns over the arrays, so Arrow's copy is freed
    found: dict[str, Any] = {}
    rule_kw = dict(fraction=fraction, min_score=min_score, min_posterior=min_posterior, seed=seed)
    ranks = ranks or Ranks()
    ctx = Context(table, scores_dir, meta, uid, seed, ranks, Path(out_dir))
    keep, post = _score_rule(ctx, scores, rule, found, per_entry_rule, min_group, weights, rule_kw)
    counts = {"pool": int(meta["num_samples"]), "scored": int(len(uid)), f"kept_by_{rule}": int(keep.sum())}
    for f in active:
        ok, info = f.keep(ctx, o)
        if info is not None:
            found[f.name] = info
        counts[f"kept_by_{f.name}"] = int(ok.sum())
        keep &= ok
    mask = np.zeros(int(meta["num_samples"]), dtype=bool)
    mask[uid[keep]] = True
    w = None
    if post is not None:
        w = np.zeros(len(mask))
        w[uid[keep]] = post[keep]
    info = {"rule": rule, "found": found, "counts": {**counts, "kept": int(mask.sum())},
            "scores": str(scores_dir), "model": meta["model"], "spec": meta["spec"]}
    sel = _write(Path(out_dir), mask, w, info, meta, ctx.files, keep, scores) if ranks.rank == 0 else None
    ranks.barrier()
    return sel if sel is not None else read_meta(out_dir)


def _write(out: Path, mask: np.ndarray, w: np.ndarray | None, info: dict[str, Any], meta: dict[str, Any],
           files: list[tuple[Path, int]], keep: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """The selection (mask, meta, weights), its uid and key list (read and written one scoring shard at
    a time) and its report; returns the meta."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sel = write_selection(out, mask, meta["shards"], meta["sizes"], info, weights=w)
    schema, lo = pa.schema([("uid", pa.int64()), ("key", pa.string())]), 0
    with pq.ParquetWriter(out / "selection.parquet", schema) as writer:
        for f, n in files:  # the scoring shards with their row counts (Context.files)
            if n:
                part = pq.read_table(f, columns=["uid", "key"]).filter(pa.array(keep[lo:lo + n]))
                writer.write_table(part.cast(schema))
            lo += n
    (out / "report.json").write_text(json.dumps({**info, "histogram": _histogram(scores, keep)}, indent=1))
    return sel


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vlp.curate select", description=__doc__.split("\n\n")[0])
    ap.add_argument("scores", help="output directory of `python -m vlp.curate score`")
    ap.add_argument("out_dir")
    ap.add_argument("--rule", choices=(*RULES, "none"), default="gmm", help="score rule (none: no score cut)")
    ap.add_argument("--fraction", type=float, default=0.3, help="top: fraction kept")
    ap.add_argument("--min-score", type=float, default=0.0, help="threshold: lowest kept score")
    ap.add_argument("--min-posterior", type=float, default=0.5, help="gmm: lowest kept clean posterior")
    ap.add_argument("--per-entry-rule", metavar="ENTRIES", help="apply the score rule inside each entry's group "
                    "of captions (one entry per line; each sample in its rarest matched entry)")
    ap.add_argument("--min-group", type=int, default=100,
                    help="per-entry-rule: entries with fewer samples are judged as one pooled group")
    ap.add_argument("--weights", action="store_true",
                    help="gmm: write per-sample weights, each kept sample's clean posterior; training draws each "
                    "sample into an epoch with that probability (lower --min-posterior to keep the doubtful)")
    ap.add_argument("--seed", type=int, default=0)
    for f in filters():  # each filter's own options (vlp/curate/filters)
        group = ap.add_argument_group(f"filter {f.name}")
        for opt in f.options:
            kw: dict[str, Any] = {"dest": opt.name, "default": opt.default, "help": opt.help}
            kw.update({k: v for k, v in (("type", opt.type), ("action", opt.action), ("metavar", opt.metavar)) if v})
            group.add_argument("--" + opt.name.replace("_", "-"), **kw)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ranks = Ranks.from_env()  # under torchrun: the filters that can split their work over ranks do
    try:
        sel = select(args.scores, args.out_dir, args.rule, fraction=args.fraction, min_score=args.min_score,
                     min_posterior=args.min_posterior, per_entry_rule=args.per_entry_rule, min_group=args.min_group,
                     weights=args.weights, seed=args.seed, ranks=ranks,
                     **{k: getattr(args, k) for k in filter_defaults()})
    except (DataError, FileNotFoundError, ValueError, MissingExtraError) as e:
        print(f"vlp.curate select: error: {e}", file=sys.stderr)
        return 2
    if ranks.rank:
        return 0
    per_epoch = f", about {sel['expected_per_epoch']:.0f} per epoch" if sel["weighted"] else ""
    print(f"kept {sel['kept']} of {sel['num_samples']} samples ({sel['kept'] / max(sel['num_samples'], 1):.1%}"
          f"{per_epoch}): {args.out_dir} (train with data.select={args.out_dir})")
    return 0
