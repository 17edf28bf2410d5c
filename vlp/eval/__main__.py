"""Evaluate a checkpoint on several tasks and datasets; write results JSON, a markdown table and an HTML report.

    python -m vlp.eval --checkpoint runs/demo --tasks zeroshot,retrieval,linear_probe --datasets fashion-mnist,digits
    torchrun --nproc_per_node=8 -m vlp.eval --checkpoint ... (the data is split across ranks)

Every task runs on every dataset of --datasets, except that a task named in `TASK:DATASET`
entries runs on those only (e.g. `--datasets digits,segmentation:clipart`). The older form `python -m vlp.eval zeroshot --checkpoint
... --dataset ...` still works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

_CLASS_BUILTINS = ("fashion-mnist", "digits")


def _legacy_zeroshot(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp.eval zeroshot",
                                     description="zero-shot classification: top-1, top-5, mean per-class recall")
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, model.safetensors file, or DeepSpeed checkpoint directory")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="fashion-mnist, digits, or a CLIP_benchmark-style webdataset directory")
    parser.add_argument("--ema", action="store_true",
                        help="evaluate the run's EMA weights (model_ema.safetensors or the checkpoint's EMA)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-samples", type=int, default=0, help="0: the whole split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from vlp.data.datasets import load_eval_dataset
    from vlp.eval.zeroshot import evaluate_zeroshot
    from vlp.loading import LOAD_ERRORS, load_model

    try:
        model, pre, tokenizer = load_model(args.checkpoint, device=args.device, ema=args.ema)
        data = load_eval_dataset(args.dataset, split=args.split, max_samples=args.max_samples)
    except LOAD_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = evaluate_zeroshot(model, tokenizer, data, pre, args.batch_size, args.device)
    res = {"task": "zeroshot", "dataset": args.dataset, "split": args.split, "checkpoint": args.checkpoint, "ema": args.ema, **res}
    print(f"zero-shot {args.dataset} ({args.split}, {res['num_samples']} images): "
          f"top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  "
          f"mean per-class recall {100 * res['mean_per_class_recall']:.2f}%")
    print(json.dumps(res))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _split_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


# CLIP_benchmark's task names, accepted beside vlp's
TASK_ALIASES = {"zeroshot_classification": "zeroshot", "zeroshot_retrieval": "retrieval"}


def _task_list(s: str) -> list[str]:
    return list(dict.fromkeys(TASK_ALIASES.get(t, t) for t in _split_list(s)))


def _unalias(item: str, sep: str) -> str:
    """A `TASK:NAME` dataset entry or `TASK.KEY=VALUE` option with a CLIP_benchmark task name, in vlp's."""
    head, s, rest = item.partition(sep)
    return TASK_ALIASES[head] + s + rest if s and head in TASK_ALIASES else item


def resolve_datasets(datasets: list[str], root: str | None) -> tuple[list[str], dict[str, str]]:
    """(entries with their data's location, {location: name as given}): `wds/NAME` (CLIP_benchmark's
    webdataset names, also as TASK:wds/NAME) is --dataset-root with CLIP_benchmark's placeholders
    filled ({dataset}: NAME, {dataset_cleaned}: NAME with '/' as '-'); a root without placeholders
    is used as it is. Other entries are their own location."""
    out, names = [], {}
    for d in (_unalias(x, ":") for x in datasets):
        head, sep, rest = d.partition(":")
        prefix, name = (head + sep, rest) if sep and rest.startswith("wds/") else ("", d)
        if not name.startswith("wds/"):
            out.append(d)
            continue
        if not root:
            raise ValueError(f"dataset '{name}' is a CLIP_benchmark webdataset name: give --dataset-root, e.g. "
                             "--dataset-root 'data/wds_{dataset_cleaned}'")
        short = name[len("wds/"):]
        try:
            path = root.format(dataset=short, dataset_cleaned=short.replace("/", "-"))
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"--dataset-root '{root}': only the placeholders {{dataset}} and {{dataset_cleaned}} "
                             f"are filled ({type(e).__name__}: {e})") from None
        if names.get(path, name) != name:
            raise ValueError(f"--dataset-root '{root}' gives the same directory '{path}' for '{names[path]}' and "
                             f"'{name}': use {{dataset}} or {{dataset_cleaned}} in it")
        if "://" in path:
            raise ValueError(f"--dataset-root '{root}' for '{name}' is a URL; vlp reads local directories "
                             "(download the shards once, e.g. with `huggingface-cli download`)")
        if not Path(path).is_dir():
            raise ValueError(f"dataset '{name}': --dataset-root gives '{path}', which is not a directory")
        out.append(prefix + path)
        names[path] = name
    return out, names


def plan(tasks: list[str], datasets: list[str]) -> list[tuple[str, str]]:
    """(task, dataset) pairs; checks task names and the datasets the built-in tasks can read."""
    from vlp.eval.tasks import get_task, task_names

    for t in tasks:
        get_task(t)  # raises naming an unknown / unavailable task
    tied: dict[str, list[str]] = {}
    plain: list[str] = []
    for d in datasets:
        head, sep, rest = d.partition(":")
        if sep and head in task_names():
            if head not in tasks:
                raise ValueError(f"dataset '{d}' names task '{head}', which is not in --tasks")
            tied.setdefault(head, []).append(rest)
        else:
            plain.append(d)
    # a task with TASK:NAME entries runs on those; every other task on the plain entries
    pairs = [(t, d) for t in tasks for d in tied.get(t, plain)]
    for t, d in pairs:
        if t in ("zeroshot", "retrieval", "linear_probe") and d not in _CLASS_BUILTINS and not Path(d).exists():
            raise ValueError(f"unknown dataset '{d}' for task '{t}': expected one of {', '.join(_CLASS_BUILTINS)} "
                             "or an existing directory / captions file")
    for t in tasks:
        if not any(p[0] == t for p in pairs):
            raise ValueError(f"task '{t}' has no dataset (every --datasets entry is tied to another task)")
    return pairs


def task_options(args: argparse.Namespace, tasks: set[str]) -> dict[str, dict]:
    """Per task, its options mapping: the shared flags (--train-split, --train-samples, --seed,
    --k-shot) fill the options of those names that the task declares (a task registered without
    declared options gets train_split, train_samples and seed, as before), then --option overrides.

    `--option TASK.KEY=VALUE`; `TASK.KEY.SUB=VALUE` sets one key of a mapping option
    (`segmentation.denseclip.lr=1e-3`). The value text goes to the task's typed parsing
    (vlp.eval.tasks.parse_options converts it to the declared type); for a task without declared
    options it is read as YAML.
    """
    import dataclasses

    import yaml

    from vlp.eval.tasks import options_class

    flags = {"train_split": args.train_split, "train_samples": args.train_samples, "seed": args.seed,
             "k_shot": args.k_shot}
    out: dict[str, dict] = {}
    typed: dict[str, bool] = {}
    for t in tasks:
        cls = options_class(t)
        typed[t] = cls is not None
        names = {f.name for f in dataclasses.fields(cls)} if cls is not None else {"train_split", "train_samples", "seed"}
        out[t] = {k: v for k, v in flags.items() if k in names}
    for item in args.option:
        key, eq, value = item.partition("=")
        task, dot, name = key.partition(".")
        path = name.split(".")
        if not (eq and dot and all(path)):
            raise ValueError(f"--option '{item}' is not of the form TASK.KEY=VALUE")
        if task not in out:
            raise ValueError(f"--option '{item}' names task '{task}', which is not in --tasks")
        node = out[task]
        for i, part in enumerate(path[:-1]):
            sub = node.get(part)
            if isinstance(sub, str):  # an earlier TASK.KEY={...} given as text
                sub = yaml.safe_load(sub)
            if sub is None:
                sub = {}
            if not isinstance(sub, dict):
                raise ValueError(f"--option '{item}': '{task}.{'.'.join(path[:i + 1])}' is not a mapping")
            node[part] = sub = dict(sub)
            node = sub
        node[path[-1]] = value if typed[task] else yaml.safe_load(value)
    return out


def _init_distributed(device_arg: str | None) -> tuple[str, bool]:
    """Join the torchrun group when launched by torchrun; returns (device, whether we initialised)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = device_arg or (f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        return device, True
    return device, False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlp.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory, model.safetensors, or checkpoints/step_N")
    p.add_argument("--ema", action="store_true", help="evaluate the run's EMA weights (trained with ema.enabled)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate the checkpoint's architecture with random weights (seed --seed): the baseline")
    p.add_argument("--tasks", default="zeroshot",
                   help="comma list: zeroshot, retrieval, linear_probe, segmentation (CLIP_benchmark's "
                        "zeroshot_classification and zeroshot_retrieval are accepted)")
    p.add_argument("--datasets", default="fashion-mnist",
                   help="comma list: fashion-mnist, digits, directories, captions files; TASK:NAME ties one to a task")
    p.add_argument("--dataset-root", default=None,
                   help="where wds/NAME datasets are, with CLIP_benchmark's placeholders: 'data/wds_{dataset_cleaned}'")
    p.add_argument("--split", default="test", help="evaluation split (linear probes train on --train-split)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--out", help="output directory (default: CHECKPOINT/eval, or beside a weights file)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-samples", type=int, default=0, help="evaluation samples per dataset; 0: all")
    p.add_argument("--train-samples", type=int, default=0, help="linear probe train samples; 0: all")
    p.add_argument("--k-shot", type=int, default=0, help="linear probe: k labelled images per class; 0: all")
    p.add_argument("--option", action="append", default=[], metavar="TASK.KEY=VALUE",
                   help="task option, e.g. segmentation.modes=zeroshot or segmentation.denseclip.lr=1e-3 "
                        "(unknown keys and values of the wrong type are refused); repeatable")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-report", action="store_true", help="skip the HTML report (no figures drawn)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached zero-shot classifiers")
    return p


def _load(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, Any]:
    """The model to evaluate: the checkpoint's weights, or its architecture at random (--random-init)."""
    from vlp.loading import load_model

    model, pre, tokenizer = load_model(args.checkpoint, device=device, ema=args.ema)
    if args.random_init:
        from vlp.models import build_model

        torch.manual_seed(args.seed)
        model = build_model(model.config).to(device).eval()
    return model, pre, tokenizer


def _write(entries: list, args: argparse.Namespace, out: Path, meta: dict, model: Any) -> None:
    """results.json, the same results in CLIP_benchmark's schema (one JSON per task and dataset under
    clip_benchmark/), and unless --no-report the HTML report with its figures; the table on stdout."""
    from vlp.eval.report import markdown_table, write_clip_benchmark, write_json, write_outputs

    if args.no_report:
        paths = {"json": write_json(out, entries, args.checkpoint, meta)}
    else:
        paths = write_outputs(out, entries, args.checkpoint, meta)
    # CLIP_benchmark's model / pretrained pair: the toolkit and architecture class, the weights evaluated
    pretrained = args.checkpoint + ("-ema" if args.ema else "") + ("-random-init" if args.random_init else "")
    cb = write_clip_benchmark(out, entries, f"vlp-{type(model).__name__}", pretrained)
    paths["clip_benchmark"] = cb[0].parent
    print()
    print(markdown_table(entries))
    for kind, path in paths.items():
        print(f"{kind}: {path}")


def _evaluate(args: argparse.Namespace, pairs: list[tuple[str, str]], options: dict, device: torch.device) -> int:
    from vlp.eval.common import fingerprint_model, make_context
    from vlp.eval.report import Entry
    from vlp.eval.tasks import DatasetSpec, run_task
    from vlp.loading import LOAD_ERRORS

    try:
        model, pre, tokenizer = _load(args, device)
    except LOAD_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "eval"
    ctx = make_context(device, workers=args.workers, figures=not args.no_report, seed=args.seed,
                       cache_dir=None if args.no_cache else out / "cache",
                       checkpoint_id=None if args.no_cache else fingerprint_model(model))
    entries: list[Entry] = []
    for task, dataset in pairs:
        spec = DatasetSpec(dataset, args.split, args.max_samples, args.batch_size, options[task])
        t0 = time.perf_counter()
        try:
            res = run_task(task, model, tokenizer, pre, spec, ctx)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: task '{task}' on dataset '{dataset}': {e}", file=sys.stderr)
            return 2
        name = getattr(args, "dataset_names", {}).get(dataset, dataset)
        entries.append(Entry(task, name, args.split, res.metrics, time.perf_counter() - t0, res.figures, res.details))
        if ctx.is_main:
            print(f"[{task} / {dataset}] " + ", ".join(f"{k}={v:.4g}" for k, v in res.metrics.items()), flush=True)
    if ctx.is_main:
        _write(entries, args, out, {"world_size": ctx.world_size, "device": str(device), "ema": args.ema,
                                    "random_init": args.random_init}, model)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["zeroshot"]:
        return _legacy_zeroshot(argv[1:])
    args = _parser().parse_args(argv)

    from vlp.eval.tasks import UnknownTaskError, parse_options

    try:  # tasks, datasets and options are checked before any model or data is loaded
        datasets, args.dataset_names = resolve_datasets(_split_list(args.datasets), args.dataset_root)
        args.option = [_unalias(o, ".") for o in args.option]
        pairs = plan(_task_list(args.tasks), datasets)
        options = {t: parse_options(t, o) for t, o in task_options(args, {t for t, _ in pairs}).items()}
    except (UnknownTaskError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device, owns_group = _init_distributed(args.device)
    try:
        return _evaluate(args, pairs, options, device)
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
