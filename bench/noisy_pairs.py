"""Noisy pairs: how much of the zero-shot accuracy that mismatched captions cost does each vlp route win back?

    python bench/noisy_pairs.py                          # Fashion-MNIST captions, r = 0.5
    python bench/noisy_pairs.py --rates 0.2 0.5 0.8
    python bench/noisy_pairs.py --quick                  # a fifth of the budget: a smoke run
    python bench/noisy_pairs.py --methods select --fresh --train-seeds 0 1 2   # means over 3 training seeds

Protocol (DESIGN.md; NCR and after): the captions of a random fraction r of the training pairs are
permuted among themselves (`python -m vlp.curate noise`, images stay, the corrupted keys are kept).
Every run gets the same total training budget, the demo's (configs/demo.yaml: 2 epochs of 60,000
pairs at batch 128, 937 optimizer steps, one process), and is scored by `python -m vlp.eval
zeroshot` on the 10,000 held-out test images, with prompts disjoint from the training captions.

Runs per r:
  clean     the demo on the clean shards (once, the ceiling)
  noisy     the demo on the noisy shards (the floor)
  soft_clip the demo on the noisy shards with loss.name=soft_clip (intra-modal soft targets)
  small_loss the demo on the noisy shards with loss.name=small_loss (drop: the noise rate r)
  select    score -> select -> continue: train on the noisy shards up to the first share of
            `--rounds` (default 25%), score every training pair with that checkpoint (`vlp.curate
            score`), keep the pairs of the clean component of a two-Gaussian fit to the scores
            (`vlp.curate select --rule gmm`, or the arguments of `--select`, e.g. `--per-entry-rule
            {entries}` to fit the cut per class name), continue on the selection from those weights
            (`model.init_from`, `data.select`) up to the next share (default 50%), score the whole
            pool again with the better model, select again, and spend the rest of the budget on the
            last selection (`--fresh`: the first phase only scores, the second phase starts from
            fresh weights on the first selection). Scoring is inference only and is not counted in
            the budget (as in DataComp, where filtering compute is not training compute).
  oracle    the demo on the pairs the noise left intact (`data.select` of every key not in the
            corrupted list): what a perfect scorer's selection reaches, the bound of selection
  select + soft_clip   the same, the last phase with loss.name=soft_clip
  select + small_loss  the same, the last phase with loss.name=small_loss (drop `--select-drop`,
            the selection's residual noise)

Reported: top-1 per run, the share of the clean-noisy gap a route recovers ((route - noisy) /
(clean - noisy)), and for the scorer its ROC AUC at telling corrupted pairs (by the kept key list)
from the rest, plus precision (clean share of the kept) and recall (kept share of the clean) of the
selection. Every figure comes from real CLI runs, started as a user would. One run on noisy pairs
moves by points with the training seed (and with the machine's arithmetic: the same noisy run gave
72.43% on one machine and 69.91% on another), so `--train-seeds` repeats every run per seed
(`train.seed`: initialization and data order) and reports the gap of the means beside each seed's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))  # the bench reads vlp's own tables from a clone that was never pip-installed


def _run(cmd: list[str], log: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    out = log.read_text()
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}) after {time.time() - t0:.0f} s: {' '.join(cmd)}\n{out[-3000:]}")
    return out


def train(run_dir: Path, shards: Path, steps: int, extra: list[str], log: Path, seed: int = 0) -> None:
    if seed:  # the training seed: initialization and data order (train.seed)
        extra = [*extra, f"train.seed={seed}"]
    if (run_dir / "model.safetensors").is_file():  # finished before: the bench reuses what it made
        made_on = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["train_shards"]
        if made_on != str(shards):
            raise SystemExit(f"{run_dir} was trained on {made_on}, not {shards}: remove it or use another --work")
        return
    _run([PY, "train.py", "--config", "configs/demo.yaml", f"run_dir={run_dir}", f"data.train_shards={shards}",
          f"train.steps={steps}", "evals={}", "train.progress_bar=false", "train.checkpoint_every_n_steps=0",
          *extra], log)


def zeroshot(run_dir: Path, test_samples: int, log: Path) -> float:
    cache = run_dir / "zeroshot.json"
    if not cache.is_file():
        extra = ["--max-samples", str(test_samples)] if test_samples else []
        out = _run([PY, "-m", "vlp.eval", "zeroshot", "--checkpoint", str(run_dir), "--dataset", "fashion-mnist",
                    "--split", "test", *extra], log)
        cache.write_text(out.strip().splitlines()[-1])
    return float(json.loads(cache.read_text())["top1"])


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney)."""
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1))


def detection(scores_dir: Path, select_dir: Path, corrupted: set[str]) -> dict:
    import pyarrow.parquet as pq

    from vlp.curate.score import read_scores

    table, _ = read_scores(scores_dir, ["key", "score"])
    keys, score = table["key"].to_pylist(), table["score"].to_numpy()
    bad = np.array([k in corrupted for k in keys])
    kept = set(pq.read_table(select_dir / "selection.parquet")["key"].to_pylist())
    keep = np.array([k in kept for k in keys])
    clean = ~bad
    return {"auc_clean_vs_corrupted": roc_auc(score, clean), "kept": int(keep.sum()),
            "precision": float((keep & clean).sum() / max(keep.sum(), 1)),
            "recall": float((keep & clean).sum() / max(clean.sum(), 1))}


def oracle_selection(noisy: Path, corrupted: set[str], out: Path) -> Path:
    """The selection a perfect scorer would make: every pair whose caption the noise left in place (the
    kept list of corrupted keys removed), in the loader's uid order (shard order, then order in the tar)."""
    import tarfile

    from vlp.data.manifest import expand_shards
    from vlp.data.position import member_key
    from vlp.data.selection import write_selection

    if (out / "selection.json").is_file():
        return out
    shards = expand_shards(str(noisy / "train.json"))
    keep, sizes = [], []
    for url in shards:
        with tarfile.open(url) as tar:
            keys = list(dict.fromkeys(mk[0] for m in tar if m.isfile() and (mk := member_key(m.name))))
        keep += [k not in corrupted for k in keys]
        sizes.append(len(keys))
    write_selection(out, np.array(keep), shards, sizes, {"rule": "oracle: the corrupted keys removed"})
    return out


def class_entries() -> list[str]:
    """The entry list for `--per-entry-rule`: every class name and synonym the training captions use
    (vlp/data/captions.py), as a user would list the concepts of their domain."""
    from vlp.data.captions import FASHION_CLASSNAMES, FASHION_SYNONYMS

    out: list[str] = []
    for names, cls in zip(FASHION_SYNONYMS, FASHION_CLASSNAMES):
        out += [e for e in (*names, cls) if e.casefold() not in {o.casefold() for o in out}]
    return out


def select_route(work: Path, tag: str, r: float, noisy: Path, a, extra: list[str], corrupted: set[str],
                 prefix: str = "", ts: int = 0):
    """score -> select -> continue at the same total budget: train on the noisy shards up to the first share
    of `a.rounds`, score the whole pool with that checkpoint, select, continue on the selection (weights
    from `model.init_from`) up to the next share, score the whole pool again, ...; `extra` goes to the
    last phase. Returns the final top-1 and the detection figures of the last scorer and selection."""
    rule = a.select.format(entries=work / "entries.txt").split()
    rs = "" if rule == ["--rule", "gmm"] else "-" + "".join(x.strip("-") for x in a.select.split()).replace("{entries}", "E")
    rs += "-fresh" if a.fresh else ""

    def name(k: int) -> str:  # the first k rounds' part of the names (one round at 50%: the bare names)
        return f"r{r}-{tag}" + ("" if a.rounds[:k] == [0.5] else "-h" + "-".join(map(str, a.rounds[:k])))

    done, init, sel = 0, [], None
    for k, share in enumerate(a.rounds, 1):
        upto = int(round(a.steps * share))
        phase = work / (f"select-{name(1)}-phase1" if k == 1 else f"select-{name(k)}{rs}-phase{k}")
        train(phase, noisy / "train.json", upto - done, ([f"data.select={sel}"] if sel else []) + init,
              work / f"{phase.name}.log", ts)
        scores = work / f"scores-{name(k)}{'' if k == 1 else rs}"
        _run([PY, "-m", "vlp.curate", "score", str(noisy / "train.json"), str(scores), "--checkpoint", str(phase),
              "--workers", "1"], work / f"score-{scores.name}.log")
        sel = work / f"selection-{name(k)}{rs}"
        _run([PY, "-m", "vlp.curate", "select", str(scores), str(sel), *rule], work / f"select-{sel.name}.log")
        det = detection(scores, sel, corrupted)
        print(f"r={r} round {k} (scored at step {upto}): AUC {det['auc_clean_vs_corrupted']:.3f}, "
              f"kept {det['kept']}, precision {det['precision']:.3f}", flush=True)
        done, init = upto, ([] if a.fresh and k == 1 else [f"model.init_from.path={phase}"])
    route = work / f"select-{prefix}{name(len(a.rounds))}{rs}"
    train(route, noisy / "train.json", a.steps - done, [f"data.select={sel}", *init, *extra], work / f"{route.name}.log", ts)
    return zeroshot(route, a.test_samples, work / f"{route.name}.eval.log"), det


def bench_seed(a, work: Path, clean: Path, ts: int) -> list[dict]:
    """Every run of the bench for training seed `ts`: clean, noisy and the routes."""
    clean_tag = f"s{a.steps}" + (f"-t{ts}" if ts else "")  # the clean run does not depend on the noise seed
    tag = clean_tag + (f"-seed{a.seed}" if a.seed else "")  # every run on noisy shards does
    train(work / f"clean-{clean_tag}", clean / "train.json", a.steps, [], work / f"clean-{clean_tag}.log", ts)
    top_clean = zeroshot(work / f"clean-{clean_tag}", a.test_samples, work / f"clean-{clean_tag}.eval.log")
    rows = [{"r": 0.0, "method": "clean", "top1": top_clean}]
    print(f"clean: top-1 {top_clean:.2%}", flush=True)
    for r in a.rates:
        noisy = work / f"noisy-r{r}-seed{a.seed}"
        if not (noisy / "train.json").is_file():
            _run([PY, "-m", "vlp.curate", "noise", str(clean / "train.json"), str(noisy), "--rate", str(r),
                  "--seed", str(a.seed)], work / f"noise-r{r}-seed{a.seed}.log")
        corrupted = set(json.loads((noisy / "corrupted.json").read_text())["keys"])
        base = work / f"noisy-r{r}-{tag}"
        train(base, noisy / "train.json", a.steps, [], work / f"{base.name}.log", ts)
        top_noisy = zeroshot(base, a.test_samples, work / f"{base.name}.eval.log")
        rows.append({"r": r, "method": "noisy", "top1": top_noisy})
        print(f"r={r} noisy: top-1 {top_noisy:.2%}", flush=True)
        if "soft_clip" in a.methods:
            soft = work / f"soft-r{r}-{tag}"
            train(soft, noisy / "train.json", a.steps, ["loss.name=soft_clip", f"soft_clip.alpha={a.alpha}"],
                  work / f"{soft.name}.log", ts)
            top = zeroshot(soft, a.test_samples, work / f"{soft.name}.eval.log")
            rows.append({"r": r, "method": f"soft_clip (alpha {a.alpha})", "top1": top})
            print(f"r={r} soft_clip: top-1 {top:.2%}", flush=True)
        if "small_loss" in a.methods:
            drop = r if a.drop is None else a.drop
            small = work / (f"small-r{r}-{tag}" + ("" if a.drop is None else f"-d{drop}"))
            train(small, noisy / "train.json", a.steps, ["loss.name=small_loss", f"small_loss.drop={drop}"],
                  work / f"{small.name}.log", ts)
            top = zeroshot(small, a.test_samples, work / f"{small.name}.eval.log")
            rows.append({"r": r, "method": f"small_loss (drop {drop})", "top1": top})
            print(f"r={r} small_loss: top-1 {top:.2%}", flush=True)
        if "oracle" in a.methods:  # the bound of selection: the intact pairs only, the whole budget on them
            sel = oracle_selection(noisy, corrupted, work / f"selection-r{r}-{tag}-oracle")
            run = work / f"oracle-r{r}-{tag}"
            train(run, noisy / "train.json", a.steps, [f"data.select={sel}"], work / f"{run.name}.log", ts)
            top = zeroshot(run, a.test_samples, work / f"{run.name}.eval.log")
            rows.append({"r": r, "method": "oracle selection (the intact pairs, from scratch)", "top1": top})
            print(f"r={r} oracle selection: top-1 {top:.2%}", flush=True)
        routes = (("select", [], ""), ("select+soft_clip", ["loss.name=soft_clip", f"soft_clip.alpha={a.alpha}"], "soft-"),
                  ("select+small_loss", ["loss.name=small_loss", f"small_loss.drop={a.select_drop}"],
                   f"small{a.select_drop}-"))
        for method, extra, prefix in routes:
            if method in a.methods:
                top, det = select_route(work, tag, r, noisy, a, extra, corrupted, prefix, ts)
                label = (f"score-select-continue{method[6:].replace('+', ' + ')} ({a.select}, scored at "
                         f"{', '.join(f'{x:.0%}' for x in a.rounds)}{', fresh weights after the first' if a.fresh else ''})")
                rows.append({"r": r, "method": label, "top1": top, **det})
                print(f"r={r} {label}: top-1 {top:.2%}, AUC {det['auc_clean_vs_corrupted']:.3f}, kept {det['kept']} "
                      f"(precision {det['precision']:.3f}, recall {det['recall']:.3f})", flush=True)
    return [{**row, "train_seed": ts} for row in rows]


def report(rows: list[dict]) -> None:
    """One table of every run (each gap against the clean and noisy runs of its own training seed),
    and with several training seeds one of the means over them (the gap of the means, and its spread)."""
    top = {(row["train_seed"], row["r"], row["method"]): row["top1"] for row in rows}

    def gap(ts: int, r: float, method: str) -> float:
        lo, hi = top[(ts, r, "noisy")], top[(ts, 0.0, "clean")]
        return (top[(ts, r, method)] - lo) / max(hi - lo, 1e-9)

    print("\n| train seed | r | method | zero-shot top-1 | gap recovered | scorer ROC AUC | kept | precision | recall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        g = "" if row["method"] in ("clean", "noisy") else f"{gap(row['train_seed'], row['r'], row['method']):.0%}"
        det = (f"{row['auc_clean_vs_corrupted']:.3f} | {row['kept']} | {row['precision']:.3f} | {row['recall']:.3f}"
               if "kept" in row else " |  |  | ")
        print(f"| {row['train_seed']} | {row['r']} | {row['method']} | {row['top1']:.2%} | {g} | {det} |")
    seeds = sorted({row["train_seed"] for row in rows})
    if len(seeds) < 2:
        return
    print(f"\nMeans over training seeds {', '.join(map(str, seeds))} (gap: of the means; sd: of the per-seed gaps)")
    print("| r | method | mean top-1 | sd top-1 | gap recovered | sd gap |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r, method in dict.fromkeys((row["r"], row["method"]) for row in rows):
        runs = np.array([top[(ts, r, method)] for ts in seeds if (ts, r, method) in top])
        g = sd = ""
        if method not in ("clean", "noisy") and len(runs) == len(seeds):
            lo = np.mean([top[(ts, r, "noisy")] for ts in seeds])
            hi = np.mean([top[(ts, 0.0, "clean")] for ts in seeds])
            g = f"{(runs.mean() - lo) / max(hi - lo, 1e-9):.0%}"
            sd = f"{np.std([gap(ts, r, method) for ts in seeds], ddof=1):.0%}"
        print(f"| {r} | {method} | {runs.mean():.2%} | {runs.std(ddof=1) if len(runs) > 1 else 0:.2%} | {g} | {sd} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", type=float, default=[0.5])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-noisy")
    ap.add_argument("--steps", type=int, default=937, help="total optimizer steps of every run (the demo's 937)")
    ap.add_argument("--rounds", nargs="+", type=float, default=[0.25, 0.5],
                    help="select: the shares of the budget at which the pool is (re)scored and selected")
    ap.add_argument("--seed", type=int, default=0, help="noise seed")
    ap.add_argument("--train-seeds", nargs="+", type=int, default=[0],
                    help="training seeds (train.seed: initialization and data order); every run is repeated per "
                         "seed and the means reported, since one run's top-1 on noisy pairs moves by points")
    ap.add_argument("--test-samples", type=int, default=0, help="test images scored (0: all 10,000)")
    ap.add_argument("--methods", nargs="+", default=["small_loss", "select"],
                    choices=["small_loss", "select", "soft_clip", "select+soft_clip", "select+small_loss", "oracle"],
                    help="routes run beside clean and noisy")
    ap.add_argument("--drop", type=float, default=None,
                    help="small_loss.drop (default: the noise rate r, as Co-teaching assumes it known)")
    ap.add_argument("--alpha", type=float, default=0.2, help="soft_clip.alpha")
    ap.add_argument("--select", default="--rule gmm", help="select: the arguments of `vlp.curate select`; "
                    "{entries} stands for the class-name entry list the bench writes (e.g. --per-entry-rule {entries})")
    ap.add_argument("--select-drop", type=float, default=0.15,
                    help="select+small_loss: small_loss.drop in the last phase (the selection's residual noise)")
    ap.add_argument("--fresh", action="store_true",
                    help="select: the first phase only trains the scorer; the second starts from fresh weights")
    ap.add_argument("--quick", action="store_true", help="a fifth of the budget, 2,000 test images")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.test_samples = a.steps // 5, 2000
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    clean = work / "fashion-mnist"
    _run([PY, "-m", "vlp.data.build", "fashion-mnist", str(clean), "--split", "train", "--no-progress"],
         work / "build.log")
    (work / "entries.txt").write_text("".join(f"{e}\n" for e in class_entries()))
    rows: list[dict] = []
    for ts in a.train_seeds:
        rows += bench_seed(a, work, clean, ts)
    report(rows)
    seeds = "" if a.train_seeds == [0] else "-t" + "-".join(map(str, a.train_seeds))
    (work / f"results-s{a.steps}{f'-seed{a.seed}' if a.seed else ''}{seeds}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
