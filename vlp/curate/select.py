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
- `--balance`, `--dedup-eps`, `--decontaminate`: MetaCLIP's balancing, SemDeDup and removal of near
  duplicates of evaluation images (vlp/curate/rules.py), combined with the score rule (`--rule none`
  for none): a sample is kept when every rule keeps it.
A sample without a score (the trainer would have dropped it) is never kept.
- `--weights` (gmm): instead of a hard cut, each kept sample gets its clean posterior as weight,
  the probability that it is in an epoch (NCR and DivideMix weigh pairs by this posterior); with
  `--min-posterior 0.05` the doubtful pairs stay, seen less often.

Writes OUT/mask.npy and OUT/selection.json (read by training), OUT/selection.parquet (uid, key of
every kept sample) and OUT/report.json (counts per rule, score histograms of kept and dropped).
At a billion samples: the score column is 4 bytes per sample (5.6 GB for 1.4B) and the rules are
one vectorized pass over it (top: a partition for the quantile; gmm: a fit on 1M samples, then a
closed-form posterior per row); the mask is 1 bit per sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from vlp.data.manifest import DataError
from vlp.data.selection import write_selection
from vlp.extras import MissingExtraError, require

RULES = ("threshold", "top", "gmm")
GMM_FIT_MAX = 1_000_000


def gmm_keep(scores: np.ndarray, min_posterior: float = 0.5, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Samples whose posterior under the higher-mean of two Gaussians is >= min_posterior."""
    post, info = gmm_posterior(scores, seed)
    return post >= min_posterior, info


def gmm_posterior(scores: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Each score's posterior under the higher-mean of two Gaussians fitted to (at most 1M of) them."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    fit = scores if len(scores) <= GMM_FIT_MAX else rng.choice(scores, GMM_FIT_MAX, replace=False)
    gm = GaussianMixture(2, random_state=seed, tol=1e-5, max_iter=500).fit(fit.reshape(-1, 1).astype(np.float64))
    hi = int(np.argmax(gm.means_.ravel()))
    post = gm.predict_proba(scores.reshape(-1, 1).astype(np.float64))[:, hi]
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
        return gmm_keep(scores, min_posterior, seed)
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


def _matrix(column: Any, dtype: Any = np.float32) -> np.ndarray:
    col = column.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(dtype, copy=False)


def _entries(path: str | Path) -> list[str]:
    try:
        return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError as e:
        raise DataError(f"cannot read the entry list '{path}': {e}") from None


def _check_embeddings(scores_dir: str | Path, role: str, model: str | None = None) -> str:
    """The scoring model of a finished run made with --embeddings (and by `model`, if named)."""
    from vlp.curate.score import scoring_meta

    meta, _ = scoring_meta(scores_dir)
    if not meta.get("embeddings"):
        raise DataError(f"{role} '{scores_dir}' was scored without --embeddings; score it again with them")
    if model is not None and meta["model"] != model:
        raise DataError(f"{role} '{scores_dir}' was scored by model {meta['model']}, the pool by {model}: "
                        "near duplicates are only comparable in one model's embedding space")
    return meta["model"]


def _image_embeddings(scores_dir: str | Path, dtype: Any = np.float32):
    """(image embeddings, keys) per scoring shard, in uid order."""
    from vlp.curate.score import iter_scores

    return ((_matrix(t["image_emb"], dtype), t["key"].to_pylist())
            for t in iter_scores(scores_dir, ["key", "image_emb"]))


def _decontaminate(scores_dir: str | Path, model: str, eval_dirs: list[str | Path], min_sim: float,
                   max_removed: float):
    from vlp.curate.rules import decontaminate_keep

    emb, keys = [], []
    for d in eval_dirs:
        for e, k in _image_embeddings(d):
            emb.append(e)
            keys += [f"{Path(d).name}:{x}" for x in k]
    ev = np.concatenate(emb) if emb else np.zeros((0, 1), np.float32)
    keep, info = decontaminate_keep(_image_embeddings(scores_dir), ev, keys, min_sim, max_removed)
    return keep, {**info, "eval_scores": [str(d) for d in eval_dirs]}


def _filters(table: Any, scores_dir: str | Path, meta: dict[str, Any], uid: np.ndarray, counts: dict[str, int],
             found: dict[str, Any], o: dict[str, Any]) -> np.ndarray:
    """The rules beside the score cut (caption length, balance, SemDeDup, decontamination): one keep mask."""
    from vlp.curate.rules import balance_keep, semdedup_stream

    keep = np.ones(len(uid), dtype=bool)
    rules = []
    if o["min_caption_words"] > 0:
        rules.append(("caption_words", lambda: (table["caption_words"].to_numpy() >= o["min_caption_words"], None)))
    if o["balance"]:
        rules.append(("balance", lambda: balance_keep(table["caption"].to_pylist(), uid, _entries(o["balance"]),
                                                      o["per_entry"], o["seed"])))
    if o["dedup_eps"] > 0:
        rules.append(("semdedup", lambda: semdedup_stream(lambda: (m for m, _ in _image_embeddings(scores_dir, np.float16)),
                                                          len(uid), o["dedup_eps"], o["dedup_clusters"], o["seed"])))
    if o["decontaminate"]:
        rules.append(("decontamination", lambda: _decontaminate(scores_dir, meta["model"], o["decontaminate"],
                                                                o["decontaminate_min_sim"],
                                                                o["decontaminate_max_removed"])))
    for name, run in rules:
        ok, info = run()
        if info is not None:
            found[name] = info
        counts[f"kept_by_{name}"] = int(ok.sum())
        keep &= ok
    return keep


def _score_rule(table: Any, scores: np.ndarray, rule: str, found: dict[str, Any], per_entry_rule: Any,
                min_group: int, weights: bool, rule_kw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """The score rule's keep mask (what it found goes to `found`), and the clean posteriors with `weights`."""
    from vlp.curate.rules import group_of

    if rule == "none":
        return np.ones(len(scores), dtype=bool), None
    if per_entry_rule:
        group, names = group_of(table["caption"].to_pylist(), _entries(per_entry_rule), min_group)
        keep, found[rule] = grouped_rule_keep(scores, group, names, rule, **rule_kw)
        return keep, None
    if weights:  # the weight of a kept sample is its clean posterior
        post, found[rule] = gmm_posterior(scores, rule_kw["seed"])
        return post >= rule_kw["min_posterior"], post
    keep, found[rule] = rule_keep(scores, rule, **rule_kw)
    return keep, None


def select(scores_dir: str | Path, out_dir: str | Path, rule: str, *, fraction: float = 0.3,
           min_score: float = 0.0, min_posterior: float = 0.5, min_caption_words: int = 0,
           balance: str | Path | None = None, per_entry: int = 20_000, dedup_eps: float = 0.0,
           dedup_clusters: int = 100, per_entry_rule: str | Path | None = None, min_group: int = 100,
           decontaminate: list[str | Path] | None = None, decontaminate_min_sim: float = 0.95,
           decontaminate_max_removed: float = 0.05, weights: bool = False, seed: int = 0) -> dict[str, Any]:
    """Apply `rule` ("none": no score cut), then optionally caption length, MetaCLIP balancing, SemDeDup
    and decontamination against evaluation sets (vlp.curate.rules) to a finished scoring run; a sample
    is kept if every rule keeps it. `weights` (gmm): each kept sample is in an epoch with probability
    its clean posterior (a weighted selection, vlp.data.selection)."""
    if per_entry_rule and rule == "none":
        raise ValueError(f"--per-entry-rule {per_entry_rule}: there is no score rule to apply per entry "
                         "(--rule none); name one (gmm, top, threshold) or drop --per-entry-rule")
    if weights and (rule != "gmm" or per_entry_rule):
        raise ValueError(f"--weights: the weights are the gmm rule's clean posteriors over the whole pool; "
                         f"{'--per-entry-rule' if per_entry_rule else f'--rule {rule}'} has none")
    from vlp.curate.rules import check_decontaminate
    from vlp.curate.score import read_scores

    if dedup_eps > 0:
        _check_embeddings(scores_dir, "the pool (--dedup-eps)")
    if decontaminate:  # refused before any work: both sides need embeddings from one model
        check_decontaminate(decontaminate_min_sim, decontaminate_max_removed)
        pool_model = _check_embeddings(scores_dir, "the pool")
        for d in decontaminate:
            _check_embeddings(d, "--decontaminate", pool_model)

    require("pyarrow.parquet", "vlp.curate select")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:  # the embeddings are never read whole: SemDeDup and decontamination stream them per shard
        table, meta = read_scores(scores_dir, ["uid", "key", "score", "caption", "caption_words"])
    except (KeyError, pa.ArrowInvalid) as e:
        raise DataError(f"'{scores_dir}' lacks a column these rules need ({e})") from None
    uid = table["uid"].to_numpy()
    scores = table["score"].to_numpy().astype(np.float32)
    found: dict[str, Any] = {}
    rule_kw = dict(fraction=fraction, min_score=min_score, min_posterior=min_posterior, seed=seed)
    keep, post = _score_rule(table, scores, rule, found, per_entry_rule, min_group, weights, rule_kw)
    counts = {"pool": int(meta["num_samples"]), "scored": int(len(uid)), f"kept_by_{rule}": int(keep.sum())}
    keep &= _filters(table, scores_dir, meta, uid, counts, found, dict(
        min_caption_words=min_caption_words, balance=balance, per_entry=per_entry, dedup_eps=dedup_eps,
        dedup_clusters=dedup_clusters, decontaminate=list(decontaminate or []),
        decontaminate_min_sim=decontaminate_min_sim, decontaminate_max_removed=decontaminate_max_removed,
        seed=seed))
    mask = np.zeros(int(meta["num_samples"]), dtype=bool)
    mask[uid[keep]] = True
    w = None
    if post is not None:
        w = np.zeros(len(mask))
        w[uid[keep]] = post[keep]
    info = {"rule": rule, "found": found, "counts": {**counts, "kept": int(mask.sum())},
            "scores": str(scores_dir), "model": meta["model"], "spec": meta["spec"]}
    sel = write_selection(out_dir, mask, meta["shards"], meta["sizes"], info, weights=w)
    out = Path(out_dir)
    pq.write_table(pa.table({"uid": uid[keep], "key": table["key"].filter(pa.array(keep))}), out / "selection.parquet")
    report = {**info, "histogram": _histogram(scores, keep)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return sel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlp.curate select", description=__doc__.split("\n\n")[0])
    ap.add_argument("scores", help="output directory of `python -m vlp.curate score`")
    ap.add_argument("out_dir")
    ap.add_argument("--rule", choices=(*RULES, "none"), default="gmm", help="score rule (none: no score cut)")
    ap.add_argument("--fraction", type=float, default=0.3, help="top: fraction kept")
    ap.add_argument("--min-score", type=float, default=0.0, help="threshold: lowest kept score")
    ap.add_argument("--min-posterior", type=float, default=0.5, help="gmm: lowest kept clean posterior")
    ap.add_argument("--min-caption-words", type=int, default=0)
    ap.add_argument("--balance", help="MetaCLIP balancing over this entry list (one entry per line)")
    ap.add_argument("--per-entry", type=int, default=20_000, help="balance: samples kept per entry (MetaCLIP's t)")
    ap.add_argument("--dedup-eps", type=float, default=0.0, help="SemDeDup: remove near duplicates above "
                    "cosine 1 - eps (scores made with --embeddings); 0: off")
    ap.add_argument("--dedup-clusters", type=int, default=100, help="SemDeDup: k-means clusters")
    ap.add_argument("--per-entry-rule", metavar="ENTRIES", help="apply the score rule inside each entry's group "
                    "of captions (one entry per line; each sample in its rarest matched entry)")
    ap.add_argument("--min-group", type=int, default=100,
                    help="per-entry-rule: entries with fewer samples are judged as one pooled group")
    ap.add_argument("--decontaminate", action="append", metavar="EVAL_SCORES",
                    help="drop near duplicates of this evaluation set's images: the output of `vlp.curate score "
                    "EVAL_SPEC EVAL_SCORES --embeddings` with the pool's checkpoint (needs the pool scored "
                    "with --embeddings too); repeat for several sets")
    ap.add_argument("--decontaminate-min-sim", type=float, default=0.95,
                    help="decontaminate: image cosine at and above which a sample is a near duplicate")
    ap.add_argument("--decontaminate-max-removed", type=float, default=0.05,
                    help="decontaminate: refuse (write nothing) when more than this share of the pool would go")
    ap.add_argument("--weights", action="store_true",
                    help="gmm: write per-sample weights, each kept sample's clean posterior; training draws each "
                    "sample into an epoch with that probability (lower --min-posterior to keep the doubtful)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        sel = select(args.scores, args.out_dir, args.rule, fraction=args.fraction, min_score=args.min_score,
                     min_posterior=args.min_posterior, min_caption_words=args.min_caption_words,
                     balance=args.balance, per_entry=args.per_entry, dedup_eps=args.dedup_eps,
                     dedup_clusters=args.dedup_clusters, per_entry_rule=args.per_entry_rule,
                     min_group=args.min_group, decontaminate=args.decontaminate,
                     decontaminate_min_sim=args.decontaminate_min_sim,
                     decontaminate_max_removed=args.decontaminate_max_removed, weights=args.weights,
                     seed=args.seed)
    except (DataError, FileNotFoundError, ValueError, MissingExtraError) as e:
        print(f"vlp.curate select: error: {e}", file=sys.stderr)
        return 2
    per_epoch = f", about {sel['expected_per_epoch']:.0f} per epoch" if sel["weighted"] else ""
    print(f"kept {sel['kept']} of {sel['num_samples']} samples ({sel['kept'] / max(sel['num_samples'], 1):.1%}"
          f"{per_epoch}): {args.out_dir} (train with data.select={args.out_dir})")
    return 0
