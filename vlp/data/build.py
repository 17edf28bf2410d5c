"""Write webdataset tar shards (image + caption + class) from built-in sources or your own images.

Shards are first written into a temporary directory next to the output and renamed into place,
and the JSON manifest is written last; a manifest therefore always describes complete shards, and
re-running with the same arguments finds it and does nothing.

    python -m vlp.data.build fashion-mnist OUT_DIR [--split train] [--shard-size N] [--format png|jpg]
    python -m vlp.data.build folder OUT_DIR --images DIR --captions captions.csv|.jsonl|.parquet
        [--resize-max-side 512] [--workers 8]       (resumable; writes SPLIT_stats.json)
    python -m vlp.data.build img2dataset OUT_DIR --images IMG2DATASET_OUTPUT_DIR
    python -m vlp.data.build clipart OUT_DIR [--split train|test] [--num-scenes N] [--size PX]
    python -m vlp.data.build manifest SPEC OUT.json [--workers N]   (count shards vlp did not write)
    python -m vlp.data.build reshard SPEC SELECTION OUT             (rewrite only a selection's samples)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from vlp.data.captions import make_caption
from vlp.data.convert import convert, img2dataset_rows, read_captions_table
from vlp.data.datasets import load_source
from vlp.data.ranks import Ranks

_PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# every tar vlp writes (build, reshard, noise, caption): members as given, integer mtime (byte-identical shards for identical inputs, no pax header)
TAR_SETTINGS = {"encoder": False, "mtime": 0}


def encode_image(array: np.ndarray, image_format: str = "png") -> bytes:
    """uint8 [H, W] or [H, W, 3] array -> PNG or JPEG bytes."""
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=1)
    elif image_format == "jpg":
        img.save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown image format '{image_format}' (expected png or jpg)")
    return buf.getvalue()


def _shard_pattern(out_dir: Path, split: str, num_shards: int) -> str:
    last = max(num_shards - 1, 0)
    return f"{out_dir}/{split}-{{{0:06d}..{last:06d}}}.tar"


def _existing_manifest(out_dir: Path, split: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest already on disk if it was made with `params` and all its shards exist."""
    path = out_dir / f"{split}.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("params") != params:
        return None
    if not all(Path(s["url"]).is_file() for s in manifest.get("shards", [])):
        return None
    return manifest


def _write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: Path,
    split: str,
    shard_size: int,
    total: int | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """Write samples with ShardWriter into a temp dir, then rename the shards into out_dir."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{split}-tmp-", dir=out_dir))
    counts: list[int] = []
    try:
        with wds.ShardWriter(str(tmp_dir / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0, **TAR_SETTINGS) as writer:
            for sample in tqdm(samples, total=total, desc=f"shards {split}", unit="img", disable=not progress):
                if writer.count >= shard_size or not counts:
                    counts.append(0)
                writer.write(sample)
                counts[-1] += 1
        shards = []
        for i, n in enumerate(counts):
            name = f"{split}-{i:06d}.tar"
            os.replace(tmp_dir / name, out_dir / name)
            shards.append({"url": str((out_dir / name).resolve()), "num_samples": n})
        # remove stale shards from an earlier, larger build of this split
        for stale in out_dir.glob(f"{split}-*.tar"):
            if stale.name not in {Path(s["url"]).name for s in shards}:
                stale.unlink()
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return shards


def write_manifest(out_dir: Path, split: str, manifest: dict[str, Any]) -> None:
    """`{out_dir}/{split}.json`, written atomically (vlp.curate writes its shard copies' manifests with it)."""
    tmp = out_dir / f".{split}.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / f"{split}.json")


def _finish(out_dir: Path, split: str, source: str, params: dict, shards: list, extra: dict) -> dict[str, Any]:
    manifest = {
        "source": source,
        "split": split,
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
        "pattern": _shard_pattern(out_dir.resolve(), split, len(shards)),
        "params": params,
        **extra,
    }
    write_manifest(out_dir, split, manifest)
    return manifest


def build_shards(
    source: str,
    out_dir: str | Path,
    split: str = "train",
    shard_size: int = 10000,
    seed: int = 0,
    max_samples: int = 0,
    image_format: str = "png",
    progress: bool = False,
) -> dict[str, Any]:
    """Write `source` ('fashion-mnist' | 'digits') as shards `{out_dir}/{split}-NNNNNN.tar`.

    Samples are written in a seeded random order (so each shard mixes all classes) with keys
    `{source}_{split}_{original index}`, a seeded caption (`txt`) and the class id (`cls`).
    Returns the manifest, also saved as `{out_dir}/{split}.json`.
    """
    out = Path(out_dir)
    if image_format not in ("png", "jpg"):
        raise ValueError(f"unknown image format '{image_format}' (expected png or jpg)")
    params = {"shard_size": shard_size, "seed": seed, "max_samples": max_samples, "image_format": image_format}
    existing = _existing_manifest(out, split, {"source": source, **params})
    if existing is not None:
        return existing
    images, labels = load_source(source, split)
    n = len(labels) if max_samples <= 0 else min(max_samples, len(labels))
    order = np.random.RandomState(seed).permutation(len(labels))[:n]
    rng = random.Random(seed)
    tag = source.replace("-", "")

    def samples() -> Iterator[dict[str, Any]]:
        for idx in order:
            label = int(labels[idx])
            yield {
                "__key__": f"{tag}_{split}_{int(idx):06d}",
                image_format: encode_image(images[idx], image_format),
                "txt": make_caption(label, rng, source).encode("utf-8"),
                "cls": str(label).encode("ascii"),
            }

    shards = _write_shards(samples(), out, split, shard_size, n, progress)
    return _finish(out, split, source, {"source": source, **params}, shards, {})


def read_captions_file(path: str | Path) -> list[tuple[str, str]]:
    """(file, caption) pairs from a CSV with a `file,caption` header, JSONL with those keys, or Parquet."""
    return read_captions_table(path)


def build_image_caption_shards(
    folder: str | Path,
    captions_file: str | Path,
    out_dir: str | Path,
    split: str = "train",
    shard_size: int = 10000,
    progress: bool = False,
    resize_max_side: int = 0,
    workers: int = 1,
) -> dict[str, Any]:
    """Shards from your own images: `file` paths are relative to `folder` (see vlp.data.convert).

    Image bytes are stored as-is under their real format's extension (jpg/png/webp; others are
    re-encoded), or resized to `resize_max_side` (long side, aspect kept). Unreadable or missing
    images and empty captions are skipped and counted (manifest `skipped`, `SPLIT_stats.json`).
    An interrupted conversion resumes where it stopped when run again with the same arguments.
    """
    root, cap_path = Path(folder), Path(captions_file)
    params = {"source": "folder", "folder": str(root.resolve()), "captions": str(cap_path.resolve()),
              "mtime": cap_path.stat().st_mtime if cap_path.exists() else None}
    return convert(read_captions_file(cap_path), root, out_dir, split=split, shard_size=shard_size,
                   resize_max_side=resize_max_side, workers=workers, progress=progress, params=params)


def build_img2dataset_shards(folder: str | Path, out_dir: str | Path, split: str = "train", shard_size: int = 10000,
                             progress: bool = False, resize_max_side: int = 0, workers: int = 1) -> dict[str, Any]:
    """Shards from an img2dataset output folder in its "files" format (image + .txt caption)."""
    rows = img2dataset_rows(folder)
    params = {"source": "img2dataset", "folder": str(Path(folder).resolve())}
    return convert(rows, folder, out_dir, split=split, shard_size=shard_size, resize_max_side=resize_max_side,
                   workers=workers, progress=progress, params=params, source="img2dataset")


def build_clipart_shards(
    out_dir: str | Path,
    split: str = "train",
    num_scenes: int = 0,
    size: int = 64,
    seed: int = 0,
    shard_size: int = 10000,
    max_per_class: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """Clipart scenes as shards `{out_dir}/{split}/{split}-NNNNNN.tar` (manifest `{out_dir}/{split}/{split}.json`).

    Each sample: `jpg`, `txt` (noisy caption: an object's SVG title), `syn.txt` (synthetic layout
    caption), `cls`, `seg.png` (class mask, 0 = background) and `json` (objects). `out_dir` also gets
    classnames.txt, zeroshot_classification_templates.txt and background_names.txt, so it is both a
    CLIP_benchmark-style classification set and a segmentation set (`vlp.data.segmentation`).
    `num_scenes` 0 means 10000 (train) or 1000 (test).
    """
    from vlp.data import clipart

    if split not in ("train", "test"):
        raise ValueError(f"unknown clipart split '{split}' (expected train or test)")
    n = num_scenes if num_scenes > 0 else (10000 if split == "train" else 1000)
    out = Path(out_dir)
    split_dir = out / split
    params = {"source": "clipart", "num_scenes": n, "size": size, "seed": seed, "shard_size": shard_size,
              "max_per_class": max_per_class, "categories": clipart.CLASSNAMES}
    existing = _existing_manifest(split_dir, split, params)
    if existing is None:
        bank = clipart.load_sprites(max_per_class)
        scenes = clipart.generate_scenes(split, n, size, seed, max_per_class, bank=bank)
        samples = (clipart.scene_sample(sc, f"clipart_{split}_{i:07d}") for i, sc in enumerate(scenes))
        shards = _write_shards(samples, split_dir, split, shard_size, n, progress)
        extra = {"sprites": len(bank.sprites[split]), "svg_failed": len(bank.failed)}
        existing = _finish(split_dir, split, "clipart", params, shards, extra)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classnames.txt").write_text("\n".join(clipart.CLASSNAMES) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(clipart.TEMPLATES) + "\n")
    (out / "background_names.txt").write_text("\n".join(clipart.BACKGROUND_NAMES) + "\n")
    return existing


def reshard(spec: str, selection: str | Path, out_dir: str | Path, shard_size: int = 10000,
            ranks: Ranks | None = None) -> dict[str, Any]:
    """Rewrite only the samples a selection (`python -m vlp.curate select`) keeps, byte for byte and in
    SPEC's order, into `{out_dir}/train-NNNNNN.tar` + `train.json`.

    Reading a selection in place (`data.select`) reads every shard each epoch; resharding reads them
    once and writes the kept fraction f, after which an epoch reads f of the bytes: it pays when f
    is small and the run has several epochs. In place the corpus is stored once (datacomp#11).
    Output shard o holds the kept samples o x shard_size up to the next shard's first, so its
    contents follow from the selection's counts alone: under several `ranks` (torchrun) rank r writes
    the output shards o with o mod world = r, reading only the input shards they draw from, and the
    shards are the same bytes as one process writes. Each finished shard leaves a marker naming the
    selection, so a killed reshard started again with the same arguments writes only the shards it had
    not finished; when all are written the manifest replaces the markers, and a rerun writes nothing."""
    from vlp.data.manifest import DataError
    from vlp.data.pipeline import shard_table
    from vlp.data.selection import Selection

    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    ranks = ranks or Ranks()
    sel = Selection(selection, "selection")
    if sel.weighted:
        raise DataError(f"reshard: '{selection}' is a weighted selection, drawn anew each epoch; rewriting "
                        "fixes one set of samples: train on it in place (data.select) or select without --weights")
    table = shard_table(spec)
    sel.check(table)
    out = Path(out_dir)
    params = {"spec": spec, "fingerprint": sel.fingerprint, "shard_size": shard_size}
    if (done := _existing_manifest(out, "train", params)) is not None:
        return done
    if ranks.rank == 0:  # an earlier reshard's manifest would name shards about to be overwritten
        (out / "train.json").unlink(missing_ok=True)
    kept = [np.flatnonzero(sel.kept_in(s)) for s in range(len(table.urls))]  # positions in each input shard
    starts = np.concatenate([[0], np.cumsum([len(k) for k in kept])]).astype(np.int64)
    total = int(starts[-1])
    (out / _RESHARD_DONE).mkdir(parents=True, exist_ok=True)
    shards = [{"url": str((out / f"train-{o:06d}.tar").resolve()), "num_samples": min(shard_size, total - lo)}
              for o, lo in enumerate(range(0, total, shard_size))]  # what each output shard must hold
    short, reused = _reshard_mine(shards, ranks, params, table.urls, kept, starts)
    with ranks.shared_dir(out / ".reshard-ranks", "vlp-reshard-") as tmp:
        short = [x for part in ranks.gather(short, tmp, "short") for x in part]
    if short:
        o, got = short[0]
        raise DataError(f"reshard: output shard {Path(shards[o]['url']).name} got {got} samples, the selection keeps "
                        f"{shards[o]['num_samples']} for it: some shards of '{spec}' could not be read in full")
    reused, manifest = int(ranks.sum(np.array([reused]))[0]), None
    if ranks.rank == 0:
        manifest = _reshard_finish(out, spec, params, shards, str(selection))
        if reused:
            print(f"reshard: {reused} of {len(shards)} output shards were finished by an earlier run of this "
                  "selection and kept", file=sys.stderr)
    ranks.barrier()
    return manifest if manifest is not None else json.loads((out / "train.json").read_text())


_RESHARD_DONE = ".reshard-done"  # one marker per finished output shard of an unfinished reshard


def _reshard_mine(shards: list, ranks: Ranks, params: dict, urls: list[str], kept: list[np.ndarray],
                  starts: np.ndarray) -> tuple[list[tuple[int, int]], int]:
    """This rank's output shards (o mod world = rank), each written unless an earlier run finished it:
    the (shard, count) of those that came out short, and how many were kept from the earlier run."""
    short, reused, size = [], 0, params["shard_size"]
    for o in range(ranks.rank, len(shards), ranks.world):
        path, want = Path(shards[o]["url"]), shards[o]["num_samples"]
        if _reshard_finished(path, params, want):
            reused += 1
        elif (got := _reshard_one(path, urls, kept, starts, o * size, o * size + want)) != want:
            short.append((o, got))
        else:
            _mark_finished(path, params, want)
    return short, reused


def _reshard_finished(path: Path, params: dict, want: int) -> bool:
    """Whether `path` is an output shard that an earlier run with `params` finished (its marker names the
    same selection and count, and the file has the size the marker recorded)."""
    try:
        return json.loads(_marker(path).read_text()) == _mark(path, params, want)
    except (OSError, json.JSONDecodeError):
        return False


def _marker(path: Path) -> Path:
    return path.parent / _RESHARD_DONE / f"{path.name}.json"


def _mark(path: Path, params: dict, n: int) -> dict[str, Any]:
    """What the marker of the finished output shard `path` (n samples) records: written after the shard, compared
    on a resume."""
    return {"params": params, "num_samples": n, "bytes": path.stat().st_size}


def _mark_finished(path: Path, params: dict, n: int) -> None:
    mark = _marker(path)
    tmp = mark.with_name(f".{mark.name}.tmp")
    tmp.write_text(json.dumps(_mark(path, params, n)))
    os.replace(tmp, mark)


def _reshard_finish(out: Path, spec: str, params: dict, shards: list, selection: str) -> dict[str, Any]:
    """Rank 0, once every output shard is written: the manifest, then away with the markers and with what
    an earlier run left (a larger reshard's extra shards, a killed run's partial shards)."""
    names = {Path(x["url"]).name for x in shards}
    manifest = _finish(out, "train", f"reshard:{spec}", params, shards, {"selection": selection})
    for stale in [*out.glob("train-*.tar"), *out.glob(".train-*.tar.tmp")]:
        if stale.name not in names:
            stale.unlink()
    shutil.rmtree(out / _RESHARD_DONE, ignore_errors=True)
    return manifest


def _reshard_one(path: Path, urls: list[str], kept: list[np.ndarray], starts: np.ndarray, lo: int, hi: int) -> int:
    """Write the kept samples lo..hi-1 (in SPEC's order) as one shard, through a rename; returns how many
    could be read. Reads only the input shards that hold them (the other samples in those are passed
    over without reading their data)."""
    from vlp.data.position import iter_shard

    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with wds.TarWriter(str(tmp), **TAR_SETTINGS) as writer:
        for s in range(int(np.searchsorted(starts, lo, side="right")) - 1, len(urls)):
            if starts[s] >= hi:
                break
            part = kept[s][max(lo - starts[s], 0):hi - starts[s]]
            if len(part):
                for _, raw in iter_shard(urls[s], {int(i) for i in part}):
                    writer.write(raw)
                    n += 1
    os.replace(tmp, path)
    return n


def _reshard_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vlp-shards reshard", description="rewrite only a selection's samples")
    ap.add_argument("spec")
    ap.add_argument("selection", help="output directory of `python -m vlp.curate select`")
    ap.add_argument("out_dir")
    ap.add_argument("--shard-size", type=int, default=10000)
    args = ap.parse_args(argv)
    ranks = Ranks.from_env()  # under torchrun each rank writes every world-th output shard
    try:
        m = reshard(args.spec, args.selection, args.out_dir, args.shard_size, ranks)
    except (ValueError, FileNotFoundError) as e:
        print(f"vlp-shards reshard: error: {e}", file=sys.stderr)
        return 2
    if ranks.rank:
        return 0
    print(f"{m['num_samples']} samples in {len(m['shards'])} shards: {m['pattern']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console script `vlp-shards`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["manifest"]:  # count an existing shard set once (vlp.data.inventory)
        from vlp.data.inventory import main as manifest_main

        return manifest_main(argv[1:])
    if argv[:1] == ["reshard"]:  # rewrite a selection's samples
        return _reshard_main(argv[1:])
    ap = argparse.ArgumentParser(prog="vlp-shards", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", choices=["fashion-mnist", "digits", "folder", "img2dataset", "clipart"])
    ap.add_argument("out_dir")
    ap.add_argument("--split", default="train", help="train | test (folder: any name)")
    ap.add_argument("--shard-size", type=int, default=10000)
    ap.add_argument("--max-samples", type=int, default=0, help="0 = all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", dest="image_format", choices=["png", "jpg"], default="png")
    ap.add_argument("--images", help="folder / img2dataset source: image directory")
    ap.add_argument("--captions", help="folder source: CSV (file,caption), JSONL or Parquet")
    ap.add_argument("--resize-max-side", type=int, default=0, help="folder / img2dataset: shrink larger images "
                    "to this long side, keeping the aspect ratio (0 = store as is)")
    ap.add_argument("--workers", type=int, default=1, help="folder / img2dataset: parallel processes")
    ap.add_argument("--num-scenes", type=int, default=0, help="clipart: scenes (0: 10000 train, 1000 test)")
    ap.add_argument("--size", type=int, default=64, help="clipart: scene side in pixels")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.source == "folder":
            if not args.images or not args.captions:
                ap.error("the folder source needs --images and --captions")
            manifest = build_image_caption_shards(
                args.images, args.captions, args.out_dir, split=args.split, shard_size=args.shard_size,
                progress=not args.no_progress, resize_max_side=args.resize_max_side, workers=args.workers,
            )
        elif args.source == "img2dataset":
            if not args.images:
                ap.error("the img2dataset source needs --images (the img2dataset output folder)")
            manifest = build_img2dataset_shards(
                args.images, args.out_dir, split=args.split, shard_size=args.shard_size,
                progress=not args.no_progress, resize_max_side=args.resize_max_side, workers=args.workers,
            )
        elif args.source == "clipart":
            manifest = build_clipart_shards(
                args.out_dir, split=args.split, num_scenes=args.num_scenes or args.max_samples, size=args.size,
                seed=args.seed, shard_size=args.shard_size, progress=not args.no_progress,
            )
        else:
            manifest = build_shards(
                args.source, args.out_dir, split=args.split, shard_size=args.shard_size, seed=args.seed,
                max_samples=args.max_samples, image_format=args.image_format, progress=not args.no_progress,
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"vlp-shards: error: {e}", file=sys.stderr)
        return 2
    extra = f", {manifest['skipped']} skipped" if manifest.get("skipped") else ""
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards{extra}: {manifest['pattern']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
