"""Noisy pairs: how much of the zero-shot accuracy that mismatched captions cost does each vlp route win back?

    python bench/noisy_pairs.py                          # Fashion-MNIST captions, r = 0.5
    python bench/noisy_pairs.py --rates 0.2 0.5 0.8
    python bench/noisy_pairs.py --quick                  # a fifth of the budget: a smoke run
    python bench/noisy_pairs.py --methods select --fresh --train-seeds 0 1 2   # means over 3 training seeds
    python bench/noisy_pairs.py --dataset clipart --methods select small_loss   # clipart scenes, with retrieval

Protocol (DESIGN.md; NCR and after): the captions of a random fraction r of the training pairs are
permuted among themselves (`python -m vlp.curate noise`, images stay, the corrupted keys are kept).
Every run gets the same total training budget, the demo's (configs/demo.yaml: 2 epochs of 60,000
pairs at batch 128, 937 optimizer steps, one process), and is scored by `python -m vlp.eval
--tasks zeroshot` on the 10,000 held-out test images, with prompts disjoint from the training captions.

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

`--dataset clipart`: the same protocol on the 10,000 clipart training scenes' layout captions (syn.txt,
"a red fruit at the top left ... on brick"), the clipart demo's tiny model (configs/clipart_demo.yaml)
at batch 128 for 300 steps, scored by zero-shot class of the largest object and by text <-> image
retrieval of the 1,000 held-out scenes' own captions (recall@5); its runs go to WORK/clipart/.

Reported: top-1 per run (and each retrieval recall), the share of the clean-noisy gap a route recovers ((route - noisy) /
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
from collections.abc import Callable
from dataclasses import dataclass
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


def fashion_entries() -> list[str]:
    """Every class name and synonym the Fashion-MNIST captions use (vlp/data/captions.py)."""
    from vlp.data.captions import FASHION_CLASSNAMES, FASHION_SYNONYMS

    out: list[str] = []
    for names, cls in zip(FASHION_SYNONYMS, FASHION_CLASSNAMES):
        out += [e for e in (*names, cls) if e.casefold() not in {o.casefold() for o in out}]
    return out


def clipart_entries() -> list[str]:
    from vlp.data.clipart import CLASSNAMES

    return list(CLASSNAMES)


@dataclass(frozen=True)
class Bench:
    """What differs between the bench's datasets: the config every run starts from, the default budget, the
    caption member, the shards it builds and how a run is scored."""

    name: str  # the `vlp.data.build` source
    config: str
    steps: int
    entries: Callable[[], list[str]]  # the entry list for `--per-entry-rule`, as a user would list their concepts
    text_key: str = "txt"
    train_args: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train",)  # the splits the bench builds
    manifest: str = "train.json"  # the training manifest, under the built folder
    subdir: str = ""  # the bench's folder under --work
    eval_dataset: str = ""  # what `vlp.eval --datasets` reads; "": the built folder
    eval_args: tuple[str, ...] = ("--tasks", "zeroshot")

    def build(self, work: Path) -> Path:
        """Build the clean shards (the builder skips what it built before); returns their training manifest."""
        out = work / self.name
        for split in self.splits:
            _run([PY, "-m", "vlp.data.build", self.name, str(out), "--split", split, "--no-progress"],
                 work / f"build-{split}.log")
        return out / self.manifest


BENCHES = {
    # the demo: 2 epochs of 60,000 pairs at batch 128, one process; the runs sit in --work itself
    "fashion-mnist": Bench("fashion-mnist", "configs/demo.yaml", 937, fashion_entries, eval_dataset="fashion-mnist"),
    # the clipart demo's model at batch 128 on the 10,000 scenes' layout captions (syn.txt): 300 steps,
    # about 4 epochs; scored by zero-shot class of the largest object and by retrieval of the 1,000 test
    # scenes' own captions
    "clipart": Bench("clipart", "configs/clipart_demo.yaml", 300, clipart_entries, "syn.txt", ("data.batch_size=128",),
                     splits=("train", "test"), manifest="train/train.json", subdir="clipart",
                     eval_args=("--tasks", "zeroshot,retrieval", "--option", "retrieval.text_key=syn.txt")),
}


def train(a, run_dir: Path, shards: Path, steps: int, extra: list[str], log: Path, seed: int = 0) -> None:
    if seed:  # the training seed: initialization and data order (train.seed)
        extra = [*extra, f"train.seed={seed}"]
    if (run_dir / "model.safetensors").is_file():  # finished before: the bench reuses what it made
        made_on = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["train_shards"]
        if made_on != str(shards):
            raise SystemExit(f"{run_dir} was trained on {made_on}, not {shards}: remove it or use another --work")
        return
    _run([PY, "train.py", "--config", a.bench.config, f"run_dir={run_dir}", f"data.train_shards={shards}",
          f"train.steps={steps}", "evals={}", "train.progress_bar=false", "train.checkpoint_every_n_steps=0",
          *a.bench.train_args, *extra], log)


def evaluate(a, run_dir: Path, log: Path) -> dict:
    """{"top1": zero-shot top-1} on the held-out test images; with the retrieval task (clipart) also the
    recalls of the test scenes' own captions (recall@5, CLIP_benchmark's headline: `t2i_r5` text -> image,
    `i2t_r5` image -> text). Cached in RUN/zeroshot.json."""
    cache = run_dir / "zeroshot.json"
    if not cache.is_file():
        extra = ["--max-samples", str(a.test_samples)] if a.test_samples else []
        _run([PY, "-m", "vlp.eval", "--checkpoint", str(run_dir), *a.bench.eval_args, "--datasets",
              a.bench.eval_dataset or str(a.work / a.bench.name), "--out", str(run_dir / "eval"), "--no-report",
              "--workers", "1", *extra], log)
        res = {e["task"]: e["metrics"] for e in json.loads((run_dir / "eval" / "results.json").read_text())["results"]}
        got = {"top1": res["zeroshot"]["top1"]}
        if "retrieval" in res:
            got |= {"t2i_r5": res["retrieval"]["image_retrieval_recall@5"],
                    "i2t_r5": res["retrieval"]["text_retrieval_recall@5"]}
        cache.write_text(json.dumps(got))
    got = json.loads(cache.read_text())
    return {k: float(got[k]) for k in ("top1", "t2i_r5", "i2t_r5") if k in got}


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


def select_route(work: Path, tag: str, r: float, noisy: Path, a, extra: list[str], corrupted: set[str],
                 prefix: str = "", ts: int = 0):
    """score -> select -> continue at the same total budget: train on the noisy shards up to the first share
    of `a.rounds`, score the whole pool with that checkpoint, select, continue on the selection (weights
    from `model.init_from`) up to the next share, score the whole pool again, ...; `extra` goes to the
    last phase. Returns the final run's metrics and the detection figures of the last scorer and selection."""
    rule = a.select.format(entries=work / "entries.txt").split()
    rs = "" if rule == ["--rule", "gmm"] else "-" + "".join(x.strip("-") for x in a.select.split()).replace("{entries}", "E")
    rs += "-fresh" if a.fresh else ""

    def name(k: int) -> str:  # the first k rounds' part of the names (one round at 50%: the bare names)
        return f"r{r}-{tag}" + ("" if a.rounds[:k] == [0.5] else "-h" + "-".join(map(str, a.rounds[:k])))

    done, init, sel = 0, [], None
    for k, share in enumerate(a.rounds, 1):
        upto = int(round(a.steps * share))
        phase = work / (f"select-{name(1)}-phase1" if k == 1 else f"select-{name(k)}{rs}-phase{k}")
        train(a, phase, noisy / "train.json", upto - done, ([f"data.select={sel}"] if sel else []) + init,
              work / f"{phase.name}.log", ts)
        scores = work / f"scores-{name(k)}{'' if k == 1 else rs}"
        _run([PY, "-m", "vlp.curate", "score", str(noisy / "train.json"), str(scores), "--checkpoint", str(phase),
              "--workers", "1", "--text-key", a.bench.text_key], work / f"score-{scores.name}.log")
        sel = work / f"selection-{name(k)}{rs}"
        _run([PY, "-m", "vlp.curate", "select", str(scores), str(sel), *rule], work / f"select-{sel.name}.log")
        det = detection(scores, sel, corrupted)
        print(f"r={r} round {k} (scored at step {upto}): AUC {det['auc_clean_vs_corrupted']:.3f}, "
              f"kept {det['kept']}, precision {det['precision']:.3f}", flush=True)
        done, init = upto, ([] if a.fresh and k == 1 else [f"model.init_from.path={phase}"])
    route = work / f"select-{prefix}{name(len(a.rounds))}{rs}"
    train(a, route, noisy / "train.json", a.steps - done, [f"data.select={sel}", *init, *extra],
          work / f"{route.name}.log", ts)
    return evaluate(a, route, work / f"{route.name}.eval.log"), det


def bench_seed(a, work: Path, clean: Path, ts: int) -> list[dict]:
    """Every run of the bench for training seed `ts` (`clean`: the clean shards' manifest): clean, noisy and
    the routes."""
    clean_tag = f"s{a.steps}" + (f"-t{ts}" if ts else "")  # the clean run does not depend on the noise seed
    tag = clean_tag + (f"-seed{a.seed}" if a.seed else "")  # every run on noisy shards does
    rows: list[dict] = []

    def whole_budget(r: float, method: str, run: Path, shards: Path, extra: list[str]) -> None:
        train(a, run, shards, a.steps, extra, work / f"{run.name}.log", ts)
        rows.append({"r": r, "method": method, **evaluate(a, run, work / f"{run.name}.eval.log")})
        print(f"r={r} {method}: {_metrics(rows[-1])}", flush=True)

    whole_budget(0.0, "clean", work / f"clean-{clean_tag}", clean, [])
    for r in a.rates:
        noisy = work / f"noisy-r{r}-seed{a.seed}"
        if not (noisy / "train.json").is_file():
            _run([PY, "-m", "vlp.curate", "noise", str(clean), str(noisy), "--rate", str(r),
                  "--seed", str(a.seed), "--text-key", a.bench.text_key], work / f"noise-r{r}-seed{a.seed}.log")
        corrupted = set(json.loads((noisy / "corrupted.json").read_text())["keys"])
        shards = noisy / "train.json"
        whole_budget(r, "noisy", work / f"noisy-r{r}-{tag}", shards, [])
        if "soft_clip" in a.methods:
            whole_budget(r, f"soft_clip (alpha {a.alpha})", work / f"soft-r{r}-{tag}", shards,
                         ["loss.name=soft_clip", f"soft_clip.alpha={a.alpha}"])
        if "small_loss" in a.methods:
            drop = r if a.drop is None else a.drop
            whole_budget(r, f"small_loss (drop {drop})", work / (f"small-r{r}-{tag}" + ("" if a.drop is None else f"-d{drop}")),
                         shards, ["loss.name=small_loss", f"small_loss.drop={drop}"])
        if "oracle" in a.methods:  # the bound of selection: the intact pairs only, the whole budget on them
            sel = oracle_selection(noisy, corrupted, work / f"selection-r{r}-{tag}-oracle")
            whole_budget(r, "oracle selection (the intact pairs, from scratch)", work / f"oracle-r{r}-{tag}", shards,
                         [f"data.select={sel}"])
        routes = (("select", [], ""), ("select+soft_clip", ["loss.name=soft_clip", f"soft_clip.alpha={a.alpha}"], "soft-"),
                  ("select+small_loss", ["loss.name=small_loss", f"small_loss.drop={a.select_drop}"],
                   f"small{a.select_drop}-"))
        for method, extra, prefix in routes:
            if method in a.methods:
                got, det = select_route(work, tag, r, noisy, a, extra, corrupted, prefix, ts)
                label = (f"score-select-continue{method[6:].replace('+', ' + ')} ({a.select}, scored at "
                         f"{', '.join(f'{x:.0%}' for x in a.rounds)}{', fresh weights after the first' if a.fresh else ''})")
                rows.append({"r": r, "method": label, **got, **det})
                print(f"r={r} {label}: {_metrics(got)}, AUC {det['auc_clean_vs_corrupted']:.3f}, kept {det['kept']} "
                      f"(precision {det['precision']:.3f}, recall {det['recall']:.3f})", flush=True)
    return [{**row, "train_seed": ts} for row in rows]


# what a run reports beside zero-shot top-1 (clipart: retrieval of the test scenes' own captions)
RETRIEVAL = (("t2i_r5", "text→image R@5"), ("i2t_r5", "image→text R@5"))


def _metrics(row: dict) -> str:
    return ", ".join([f"top-1 {row['top1']:.2%}", *(f"{name} {row[k]:.2%}" for k, name in RETRIEVAL if k in row)])


def report(rows: list[dict]) -> None:
    """One table of every run (each gap against the clean and noisy runs of its own training seed), and
    with several training seeds one of the means over them (the gap of the means, and its spread). Each
    metric the runs have (zero-shot top-1; for clipart also retrieval) gets its own gap."""
    keys = ["top1", *(k for k, _ in RETRIEVAL if all(k in row for row in rows))]
    names = {"top1": "zero-shot top-1", **dict(RETRIEVAL)}
    val = {(row["train_seed"], row["r"], row["method"], k): row[k] for row in rows for k in keys}

    def gap(ts: int, r: float, method: str, k: str) -> float:
        lo, hi = val[(ts, r, "noisy", k)], val[(ts, 0.0, "clean", k)]
        return (val[(ts, r, method, k)] - lo) / max(hi - lo, 1e-9)

    cols = " | ".join(f"{names[k]} | gap recovered" + ("" if k == "top1" else f" ({names[k]})") for k in keys)
    print(f"\n| train seed | r | method | {cols} | scorer ROC AUC | kept | precision | recall |")
    print("| --- " * (7 + 2 * len(keys)) + "|")
    for row in rows:
        cells = [f"{row[k]:.2%} | " + ("" if row["method"] in ("clean", "noisy")
                                       else f"{gap(row['train_seed'], row['r'], row['method'], k):.0%}") for k in keys]
        det = (f"{row['auc_clean_vs_corrupted']:.3f} | {row['kept']} | {row['precision']:.3f} | {row['recall']:.3f}"
               if "kept" in row else " |  |  | ")
        print(f"| {row['train_seed']} | {row['r']} | {row['method']} | {' | '.join(cells)} | {det} |")
    seeds = sorted({row["train_seed"] for row in rows})
    if len(seeds) < 2:
        return
    print(f"\nMeans over training seeds {', '.join(map(str, seeds))} (gap: of the means; sd: of the per-seed gaps)")
    print("| r | method | metric | mean | sd | gap recovered | sd gap |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r, method in dict.fromkeys((row["r"], row["method"]) for row in rows):
        for k in keys:
            runs = np.array([val[(ts, r, method, k)] for ts in seeds if (ts, r, method, k) in val])
            g = sd = ""
            if method not in ("clean", "noisy") and len(runs) == len(seeds):
                lo = np.mean([val[(ts, r, "noisy", k)] for ts in seeds])
                hi = np.mean([val[(ts, 0.0, "clean", k)] for ts in seeds])
                g = f"{(runs.mean() - lo) / max(hi - lo, 1e-9):.0%}"
                sd = f"{np.std([gap(ts, r, method, k) for ts in seeds], ddof=1):.0%}"
            print(f"| {r} | {method} | {names[k]} | {runs.mean():.2%} | "
                  f"{runs.std(ddof=1) if len(runs) > 1 else 0:.2%} | {g} | {sd} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", type=float, default=[0.5])
    ap.add_argument("--dataset", choices=sorted(BENCHES), default="fashion-mnist",
                    help="fashion-mnist: the demo's captions; clipart: the scenes' layout captions, with retrieval")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-noisy",
                    help="where the bench's shards and runs go (clipart: its clipart/ folder)")
    ap.add_argument("--steps", type=int, default=None,
                    help="total optimizer steps of every run (default: fashion-mnist 937, the demo's; clipart 300)")
    ap.add_argument("--rounds", nargs="+", type=float, default=[0.25, 0.5],
                    help="select: the shares of the budget at which the pool is (re)scored and selected")
    ap.add_argument("--seed", type=int, default=0, help="noise seed")
    ap.add_argument("--train-seeds", nargs="+", type=int, default=[0],
                    help="training seeds (train.seed: initialization and data order); every run is repeated per "
                         "seed and the means reported, since one run's top-1 on noisy pairs moves by points")
    ap.add_argument("--test-samples", type=int, default=0, help="test images scored (0: all of them)")
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
    a.bench = BENCHES[a.dataset]
    a.steps = a.steps or a.bench.steps
    if a.quick:
        a.steps, a.test_samples = a.steps // 5, 2000
    a.work = work = (a.work / a.bench.subdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    clean = a.bench.build(work)
    (work / "entries.txt").write_text("".join(f"{e}\n" for e in a.bench.entries()))
    rows: list[dict] = []
    for ts in a.train_seeds:
        rows += bench_seed(a, work, clean, ts)
    report(rows)
    seeds = "" if a.train_seeds == [0] else "-t" + "-".join(map(str, a.train_seeds))
    (work / f"results-s{a.steps}{f'-seed{a.seed}' if a.seed else ''}{seeds}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
