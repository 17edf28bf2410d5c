"""Weighted mixtures of data sources, each of a kind that says how its text is made.

    data.sources:
      - {name: laion, shards: /d/laion/{000..999}.tar, weight: 0.8}                  # kind: caption
      - {name: inet, shards: /d/inet/train.json, weight: 0.2, kind: label,
         classnames_from: fashion-mnist}                                             # image + class id
      - {name: coco, shards: /d/coco/{00..09}.tar, weight: 0.1, kind: multi_text}    # several captions

Kinds: `caption` reads the text member (`text_key`, first present of "txt;json"); `label` reads
the class id (`label_key`) and writes a caption from the source's classnames and templates
(one template per sample, seeded by the sample key, and in resampled mixtures also by its
position); `multi_text` reads a JSON list of captions (or newline-separated captions) and picks
one per sample, seeded the same way.

Mixing ("epochs over each source"): inside every reader slot, sample j of source i is placed at
time (j + u) / weight_i with u uniform in [0, 1) from a seeded generator, and the slot reads in
time order up to the moment the first source runs out. The fraction of source i is therefore
weight_i / sum(weights) in every stretch of the stream, each sample is read at most once per
epoch, and the order is a pure function of (seed, epoch, split, slot), which keeps the exact
resume of vlp.data.position. Samples of the other sources not reached in an epoch come up in
later epochs under another shuffle. `data.mixture: resample` draws with replacement instead
(vlp.data.resample).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlp.data.decode import Events, _bump, decode_text
from vlp.data.manifest import DataError, stable_seed
from vlp.data.position import ShardTable
from vlp.data.selection import Selection, open_selection

KINDS = ("caption", "label", "multi_text")


@dataclass
class Source:
    """A resolved source: its shards, its text maker and where its uids start."""

    name: str
    kind: str
    weight: float
    table: ShardTable
    offset: int
    image_keys: list[str]
    text_of: Any  # (sample, events) -> str | None
    selection: Selection | None = None  # the samples to read (vlp.data.selection); None: all


def _keys(spec: str) -> list[str]:
    return [k.strip() for k in str(spec).split(";") if k.strip()]


def _draw(sample: dict) -> tuple[int, ...]:
    """The sample's position in a resampled epoch (so repeated draws choose anew), else nothing."""
    return (sample["__draw__"],) if "__draw__" in sample else ()


class CaptionText:
    def __init__(self, text_keys: list[str], max_chars: int) -> None:
        self.text_keys, self.max_chars = text_keys, max_chars

    def __call__(self, sample: dict, events: Events) -> str | None:
        raw = next((sample[k] for k in self.text_keys if k in sample), None)
        return decode_text(raw, self.max_chars, events)


class StreamTexts:
    """One caption per stream (e.g. the alt-text and a synthetic caption): a tuple, or None (sample
    skipped) when any stream's text is missing."""

    def __init__(self, streams: list[CaptionText]) -> None:
        self.streams = streams

    def __call__(self, sample: dict, events: Events) -> tuple[str, ...] | None:
        texts = tuple(s(sample, events) for s in self.streams)
        return None if any(t is None for t in texts) else texts


class LabelText:
    """Class id -> caption from classnames x templates, one template per sample (seeded by key)."""

    def __init__(self, label_key: str, classnames: list[str], templates: list[str], seed: int, epoch: int) -> None:
        self.label_key, self.classnames, self.templates = label_key, classnames, templates
        self.seed, self.epoch = seed, epoch

    def __call__(self, sample: dict, events: Events) -> str | None:
        raw = sample.get(self.label_key)
        if raw is None:
            _bump(events, "skipped:no_label")
            return None
        try:
            label = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            label = -1
        if not 0 <= label < len(self.classnames):
            _bump(events, "skipped:bad_label")
            return None
        rng = random.Random(stable_seed("template", self.seed, self.epoch, sample["__key__"], *_draw(sample)))
        return rng.choice(self.templates).format(self.classnames[label])


class MultiText:
    """One of several captions, seeded by the sample key: of a member holding a JSON list (or one caption per
    line), or, with text_key "a+b", of the members a and b (the alt-text and a synthetic caption)."""

    def __init__(self, text_keys: list[str], max_chars: int, seed: int, epoch: int) -> None:
        self.members = [k.strip() for k in text_keys[0].split("+") if k.strip()] if len(text_keys) == 1 and \
            "+" in text_keys[0] else []
        self.caption = CaptionText(text_keys, 0)
        self.max_chars, self.seed, self.epoch = max_chars, seed, epoch

    def _options(self, sample: dict, events: Events) -> list[str] | None:
        if self.members:  # "txt+syn.txt": each present member is one option (alt-text or a synthetic caption)
            got = [decode_text(sample[k], 0, {}) for k in self.members if k in sample]
            if not any(got):
                _bump(events, "skipped:no_caption")
                return None
            return [g for g in got if g]
        whole = self.caption(sample, events)
        if whole is None:
            return None
        try:
            options = json.loads(whole)
            return [options] if isinstance(options, str) else list(options)
        except json.JSONDecodeError:
            return whole.splitlines()

    def __call__(self, sample: dict, events: Events) -> str | None:
        options = self._options(sample, events)
        if options is None:
            return None
        options = [str(o).strip() for o in options if str(o).strip()]
        if not options:
            _bump(events, "skipped:empty_caption")
            return None
        rng = random.Random(stable_seed("caption", self.seed, self.epoch, sample["__key__"], *_draw(sample)))
        text = rng.choice(options)
        if self.max_chars and len(text) > self.max_chars:
            _bump(events, "converted:caption_truncated")
            text = text[: self.max_chars]
        return text


def _classnames(src: Any, where: str) -> list[str]:
    from vlp.data.captions import CLASSNAMES

    names = list(src.classnames)
    if src.classnames_from:
        if src.classnames_from not in CLASSNAMES:
            raise DataError(f"{where}.classnames_from: unknown '{src.classnames_from}' "
                            f"(known: {', '.join(sorted(CLASSNAMES))})")
        names = list(CLASSNAMES[src.classnames_from])
    if not names:
        raise DataError(f"{where}: a label source needs classnames or classnames_from")
    return names


def _templates(src: Any, where: str) -> list[str]:
    from vlp.data.captions import TRAIN_TEMPLATES

    templates = list(src.templates) or list(TRAIN_TEMPLATES.get(src.classnames_from, ["a photo of a {}."]))
    for t in templates:
        if t.count("{}") != 1:
            raise DataError(f"{where}.templates: '{t}' must contain exactly one '{{}}'")
    return templates


def source_specs(data: Any) -> list[Any]:
    """The configured sources, or the single caption source `data.train_shards`."""
    if list(getattr(data, "sources", []) or []):
        return list(data.sources)
    return [_Single(data)]


@dataclass
class _Single:
    """`data.train_shards` seen as a one-entry `data.sources`."""

    data: Any

    def __getattr__(self, name: str) -> Any:
        defaults = {"name": "train", "shards": self.data.train_shards, "weight": 1.0, "kind": "caption",
                    "label_key": "cls", "classnames": [], "classnames_from": "", "templates": [], "prefix": ""}
        if name in defaults:
            return defaults[name]
        return getattr(self.data, name)


def read_order_settings(run_config: dict[str, Any]) -> dict[str, Any]:
    """The settings (dotted key -> value) that fix an epoch's read order, from a plain run config.

    A data position is a cursor per slot into that order (vlp.data.split), so it holds only while
    these stay the same; shard sizes and the layout are checked against the position itself."""
    d = run_config["data"]
    out = {"train.seed": run_config["train"]["seed"], "data.shuffle_buffer": d.get("shuffle_buffer"),
           "data.mixture": d.get("mixture", "epochs")}
    if out["data.mixture"] == "resample":
        out["data.train_num_samples"] = d.get("train_num_samples", 0)
    if not d.get("sources"):
        out["data.train_shards"] = d.get("train_shards")
        out["data.select"] = d.get("select", "")
    for i, src in enumerate(d.get("sources") or []):
        out.update({f"data.sources[{i}].{k}": src.get(k, "") for k in ("name", "shards", "weight", "select")})
    return out


def build_sources(data: Any, tables: list[ShardTable], seed: int, epoch: int) -> list[Source]:
    out, offset = [], 0
    specs = source_specs(data)
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or not all(names):
        raise DataError(f"data.sources: every source needs a unique name, got {names}")
    streams = list(getattr(data, "text_streams", []) or [])
    for i, (src, table) in enumerate(zip(specs, tables)):
        where = f"data.sources[{i}] ({src.name})"
        if src.kind not in KINDS:
            raise DataError(f"{where}.kind: unknown '{src.kind}' (known: {', '.join(KINDS)})")
        if not src.weight > 0:
            raise DataError(f"{where}.weight must be > 0, got {src.weight}")
        max_chars = int(data.max_caption_chars)
        if streams and src.kind != "caption":
            raise DataError(f"{where}: data.text_streams reads caption sources only, not kind '{src.kind}'")
        if streams:
            text_of: Any = StreamTexts([CaptionText(_keys(k), max_chars) for k in streams])
        elif src.kind == "caption":
            text_of = CaptionText(_keys(src.text_key), max_chars)
        elif src.kind == "label":
            text_of = LabelText(src.label_key, _classnames(src, where), _templates(src, where), seed, epoch)
        else:
            text_of = MultiText(_keys(src.text_key), max_chars, seed, epoch)
        selection = open_selection(src, i)
        if selection is not None:
            selection.check(table)
        out.append(Source(src.name, src.kind, float(src.weight), table, offset, _keys(src.image_key), text_of,
                          selection))
        offset += table.num_units
    return out


def merge_order(lengths: list[int], weights: list[float], rng_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, position in source) of each step of a slot's mixed stream (see module doc)."""
    live = [i for i, n in enumerate(lengths) if n > 0]
    if len(live) <= 1:
        n = lengths[live[0]] if live else 0
        return np.full(n, live[0] if live else 0, dtype=np.int64), np.arange(n, dtype=np.int64)
    horizon = min(lengths[i] / weights[i] for i in live)
    rng = np.random.default_rng(rng_seed)
    src, pos, times = [], [], []
    for i in live:
        t = (np.arange(lengths[i]) + rng.random(lengths[i])) / weights[i]
        keep = t < horizon
        src.append(np.full(int(keep.sum()), i, dtype=np.int64))
        pos.append(np.flatnonzero(keep))
        times.append(t[keep])
    order = np.argsort(np.concatenate(times), kind="stable")
    return np.concatenate(src)[order], np.concatenate(pos)[order]
