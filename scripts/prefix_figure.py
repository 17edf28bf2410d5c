"""Figure of docs/prefix.md: retrieval recall and zero-shot top-1 of runs with and without prefixes.

    python scripts/prefix_figure.py OUT.png NAME=EVAL_DIR[,EVAL_DIR...] ...

Each EVAL_DIR holds a results.json of `python -m vlp.eval` (its entries are merged per name), and
the run's training loss is read from the metrics.jsonl two levels up (RUN/eval_x/results.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _results(dirs: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dirs:
        res = json.loads((Path(d) / "results.json").read_text())
        mode = Path(d).name
        for e in res["results"]:
            for k, v in e["metrics"].items():
                out[f"{e['task']}/{k}/{mode}"] = v
    return out


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, runs = Path(argv[0]), [a.partition("=") for a in argv[1:]]
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(11, 3.8))
    keys = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
    labels = [f"{'t->i' if d == 'image' else 'i->t'} R@{k}" for d in ("image", "text") for k in (1, 5, 10)]
    width = 0.8 / len(runs)
    seen: set[Path] = set()
    for i, (name, _, dirs) in enumerate(runs):
        r = _results(dirs.split(","))
        vals = [100 * next(v for k, v in r.items() if k.startswith(f"retrieval/{m}/")) for m in keys]
        ax_r.bar([j + i * width for j in range(len(keys))], vals, width, label=name)
        metrics = Path(dirs.split(",")[0]).parent / "metrics.jsonl"
        if metrics in seen:  # another mode of the same run: one loss curve
            continue
        seen.add(metrics)
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        steps = [x["step"] for x in rows if "loss" in x]
        ax_l.plot(steps, [x["loss"] for x in rows if "loss" in x], label=name)
    ax_r.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], labels, fontsize=8)
    ax_r.set_ylabel("recall (%)")
    ax_r.set_title("held-out clipart captions (1,000 scenes)")
    ax_r.legend(fontsize=8)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("training loss")
    ax_l.set_title("training loss (same data order)")
    ax_l.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
