"""Results of an eval run as JSON, a markdown table and a self-contained HTML report.

The HTML embeds every figure as a base64 PNG (matplotlib, Agg backend), so the one file can
be mailed, attached to an issue or opened from any directory.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlp.eval.tasks import Figure

_PERCENT_WORDS = ("top1", "top5", "recall", "acc", "iou", "miou")


@dataclass
class Entry:
    """One task on one dataset."""

    task: str
    dataset: str
    split: str
    metrics: dict[str, Any]
    seconds: float
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def is_percent(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in _PERCENT_WORDS) and k not in ("num_samples",)


def label(key: str) -> str:
    """Column title: CLIP_benchmark's long retrieval names shortened to their direction."""
    for prefix, short in (("image_retrieval_recall@", "text->image R@"), ("text_retrieval_recall@", "image->text R@")):
        if key.startswith(prefix):
            return short + key[len(prefix):] + " (%)"
    return f"{key} (%)" if is_percent(key) else key


def fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{100 * value:.2f}" if is_percent(key) else f"{value:g}"
    return str(value)


def results_dict(entries: Iterable[Entry], checkpoint: str, extra: dict | None = None) -> dict[str, Any]:
    return {"checkpoint": checkpoint, **(extra or {}),
            "results": [{"task": e.task, "dataset": e.dataset, "split": e.split, "metrics": e.metrics,
                         "seconds": round(e.seconds, 3), **({"details": e.details} if e.details else {})}
                        for e in entries]}


def _tables(entries: list[Entry]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per task: (task, header, rows) with the union of that task's metric names as columns."""
    out = []
    for task in dict.fromkeys(e.task for e in entries):
        group = [e for e in entries if e.task == task]
        keys = list(dict.fromkeys(k for e in group for k in e.metrics))
        header = ["dataset", "split", *[label(k) for k in keys]]
        rows = [[e.dataset, e.split, *[fmt(k, e.metrics[k]) if k in e.metrics else "" for k in keys]] for e in group]
        out.append((task, header, rows))
    return out


def markdown_table(entries: list[Entry]) -> str:
    parts = []
    for task, header, rows in _tables(entries):
        parts.append(f"### {task}\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join("---" for _ in header) + "|")
        parts.extend("| " + " | ".join(r) + " |" for r in rows)
        parts.append("")
    return "\n".join(parts)


def figure_png(fig: Figure) -> bytes:
    from vlp.extras import require

    matplotlib = require("matplotlib", "the figures of the eval report (or pass --no-report)")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    mpl_fig = fig.draw()
    buf = io.BytesIO()
    mpl_fig.savefig(buf, format="png", dpi=100)
    plt.close(mpl_fig)
    return buf.getvalue()


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: 0 1.5em 1.5em 0; vertical-align: top; }
figcaption { font-size: 13px; color: #555; max-width: 600px; }
img { max-width: 100%; border: 1px solid #eee; }
.meta { color: #666; font-size: 13px; }
"""


def html_report(entries: list[Entry], checkpoint: str, meta: dict[str, Any] | None = None) -> str:
    """One self-contained HTML page: a metrics table and the figures of each task."""
    esc = html.escape
    body = [f"<h1>vlp evaluation</h1><p class='meta'>checkpoint: <code>{esc(checkpoint)}</code>"]
    for k, v in (meta or {}).items():
        body.append(f" &middot; {esc(str(k))}: {esc(str(v))}")
    body.append("</p>")
    for task, header, rows in _tables(entries):
        body.append(f"<h2 id='{esc(task)}'>{esc(task)}</h2><table><tr>"
                    + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        body.extend("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        body.append("</table>")
        for e in (e for e in entries if e.task == task):
            for fig in e.figures:
                png = base64.b64encode(figure_png(fig)).decode()
                body.append(f"<figure><img alt='{esc(fig.title)}' src='data:image/png;base64,{png}'>"
                            f"<figcaption><b>{esc(fig.title)}</b><br>{esc(fig.caption)}</figcaption></figure>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>vlp evaluation</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def _jsonable(x: Any) -> Any:
    """numpy / torch scalars and arrays in details become plain JSON values."""
    import numpy as np
    import torch

    return x.tolist() if isinstance(x, (np.ndarray, np.generic, torch.Tensor)) else str(x)


def write_json(out_dir: Path, entries: list[Entry], checkpoint: str, meta: dict[str, Any] | None = None) -> Path:
    """results.json under out_dir (what `--no-report` writes alone)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(results_dict(entries, checkpoint, meta), indent=1, default=_jsonable))
    return path


# vlp task -> (CLIP_benchmark task, {vlp metric: CLIP_benchmark metric}); metrics not named here keep
# their name (retrieval's image_retrieval_recall@k / text_retrieval_recall@k already are CLIP_benchmark's)
CLIP_BENCHMARK_NAMES: dict[str, tuple[str, dict[str, str]]] = {
    "zeroshot": ("zeroshot_classification", {"top1": "acc1", "top5": "acc5"}),
    "retrieval": ("zeroshot_retrieval", {}),
    "linear_probe": ("linear_probe", {"top1": "lp_acc1", "top5": "lp_acc5",
                                      "mean_per_class_recall": "lp_mean_per_class_recall"}),
}


def clip_benchmark_record(entry: Entry, model: str, pretrained: str, language: str = "en") -> dict[str, Any]:
    """One result in CLIP_benchmark's JSON schema (what `clip_benchmark eval` dumps and
    `clip_benchmark build` reads): dataset, model, pretrained, task, metrics, language."""
    task, names = CLIP_BENCHMARK_NAMES.get(entry.task, (entry.task, {}))
    metrics = {names.get(k, k): v for k, v in entry.metrics.items()}
    return {"dataset": entry.dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
            "language": language}


def write_clip_benchmark(out_dir: Path, entries: list[Entry], model: str, pretrained: str) -> list[Path]:
    """`clip_benchmark/{dataset}_{pretrained}_{model}_{language}_{task}.json` per entry (CLIP_benchmark's
    default output name; `/` in the dataset and pretrained names become `_`)."""
    folder = out_dir / "clip_benchmark"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for e in entries:
        rec = clip_benchmark_record(e, model, pretrained)
        dataset = rec["dataset"].removeprefix("wds/")
        name = "_".join(x.replace("/", "_").strip("_") for x in (dataset, pretrained, model, rec["language"], rec["task"]))
        paths.append(folder / f"{name}.json")
        paths[-1].write_text(json.dumps(rec, default=_jsonable))
    return paths


def write_outputs(out_dir: Path, entries: list[Entry], checkpoint: str, meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """results.json, results.md and report.html under out_dir."""
    paths = {"json": write_json(out_dir, entries, checkpoint, meta), "markdown": out_dir / "results.md",
             "html": out_dir / "report.html"}
    paths["markdown"].write_text(markdown_table(entries))
    paths["html"].write_text(html_report(entries, checkpoint, meta))
    return paths
