"""Images + captions -> webdataset shards: parallel, resumable, with a stats file.

Input rows (file, caption) come from a CSV / JSONL / Parquet table next to an image folder, or
from an img2dataset output folder ("files" format: `00000/000000123.jpg` + `.txt` beside it).
Row i goes to job i // shard_size; each job writes one tar into `OUT/.SPLIT-parts/` and then a
small JSON record of what it wrote. An interrupted conversion, run again with the same
arguments, redoes only the jobs without a record. When all jobs are done the non-empty tars
are moved to `OUT/SPLIT-NNNNNN.tar`, and `SPLIT_stats.json` and the manifest `SPLIT.json` are
written (the manifest last, so it always describes complete shards).

Images are stored as they are, unless `resize_max_side` is set and the long side is larger:
then they are resized keeping the aspect ratio and re-encoded (JPEG q95, PNG if they have
alpha). Rows that cannot be used are skipped and counted by reason in the stats.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

_PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_BINS = (0, 16, 32, 64, 128, 256, 512, 1024, 1 << 62)


def read_captions_table(path: str | Path) -> list[tuple[str, str]]:
    """(file, caption) rows of a CSV (header `file,caption`), JSONL, or Parquet table."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"captions file '{p}' not found")
    if p.suffix == ".parquet":
        from vlp.extras import MissingExtraError, require

        try:
            pq = require("pyarrow.parquet", f"reading the Parquet captions file '{p}'")
        except MissingExtraError as e:
            raise ValueError(str(e)) from None
        table = pq.read_table(p)
        if not {"file", "caption"} <= set(table.column_names):
            raise ValueError(f"{p}: Parquet needs columns 'file' and 'caption', has {table.column_names}")
        return [(str(f), "" if c is None else str(c))
                for f, c in zip(table.column("file").to_pylist(), table.column("caption").to_pylist())]
    pairs: list[tuple[str, str]] = []
    if p.suffix in (".jsonl", ".json"):
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "file" not in row or "caption" not in row:
                raise ValueError(f"{p}:{lineno}: JSONL rows need 'file' and 'caption' keys")
            pairs.append((str(row["file"]), str(row["caption"])))
        return pairs
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{p}: CSV needs a header with columns 'file' and 'caption'")
        for row in reader:
            pairs.append((row["file"], row["caption"]))
    return pairs


def img2dataset_rows(folder: str | Path) -> list[tuple[str, str]]:
    """(image path relative to folder, caption) of an img2dataset "files" output folder."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"img2dataset folder '{root}' not found")
    rows = []
    for img in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = img.with_suffix(".txt")
        rows.append((str(img.relative_to(root)), txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""))
    if not rows:
        raise ValueError(f"img2dataset folder '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return rows


def _encode(data: bytes, max_side: int) -> tuple[str, bytes, tuple[int, int], bool]:
    """(extension, bytes, (width, height), resized); raises on an unreadable image."""
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        fmt, size = img.format, img.size
        if size[0] == 0 or size[1] == 0:
            raise ValueError("zero-size image")
        ext = _PIL_FORMAT_EXT.get(fmt or "")
        if max_side and max(size) > max_side or ext is None:
            img.load()
            scale = min(1.0, max_side / max(size)) if max_side else 1.0
            new = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            out = img.convert("RGBA" if alpha else "RGB")
            if new != size:
                out = out.resize(new, Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            if alpha:
                out.save(buf, format="PNG")
            else:
                out.save(buf, format="JPEG", quality=95)
            return ("png" if alpha else "jpg"), buf.getvalue(), new, new != size
    return ext, data, size, False


def _job(args: tuple[int, list[tuple[int, str, str]], str, str, int]) -> dict[str, Any]:
    """Write one job's tar and its record; returns the record."""
    job, rows, root, parts, max_side = args
    parts_dir = Path(parts)
    tmp = parts_dir / f".job-{job:06d}.tar.tmp"
    rec: dict[str, Any] = {"job": job, "count": 0, "skipped": {}, "resized": 0, "image_bytes": 0,
                           "caption_chars": [], "long_sides": []}
    with tarfile.open(tmp, "w") as tar:
        for i, name, caption in rows:
            caption = caption.strip()
            reason = None
            try:
                data = (Path(root) / name).read_bytes()
            except OSError:
                reason = "missing_file"
            if reason is None and not caption:
                reason = "empty_caption"
            if reason is None:
                try:
                    ext, data, size, resized = _encode(data, max_side)
                except Exception:  # any unreadable image is skipped, never fatal
                    reason = "unreadable_image"
            if reason is not None:
                rec["skipped"][reason] = rec["skipped"].get(reason, 0) + 1
                continue
            for member_ext, payload in ((ext, data), ("txt", caption.encode("utf-8"))):
                info = tarfile.TarInfo(f"{i:09d}.{member_ext}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
            rec["count"] += 1
            rec["resized"] += int(resized)
            rec["image_bytes"] += len(data)
            rec["caption_chars"].append(len(caption))
            rec["long_sides"].append(max(size))
    os.replace(tmp, parts_dir / f"job-{job:06d}.tar")
    tmp_rec = parts_dir / f".job-{job:06d}.json.tmp"
    tmp_rec.write_text(json.dumps(rec))
    os.replace(tmp_rec, parts_dir / f"job-{job:06d}.json")
    return rec


def _stats(records: list[dict[str, Any]], num_rows: int) -> dict[str, Any]:
    skipped: dict[str, int] = {}
    chars, sides = [], []
    for r in records:
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        chars += r["caption_chars"]
        sides += r["long_sides"]
    hist = {}
    for lo, hi in zip(CAPTION_BINS, CAPTION_BINS[1:]):
        label = f"{lo}-{hi - 1}" if hi < CAPTION_BINS[-1] else f">={lo}"
        hist[label] = sum(lo <= c < hi for c in chars)
    sides.sort()
    return {
        "rows": num_rows,
        "samples": sum(r["count"] for r in records),
        "skipped": skipped,
        "resized": sum(r["resized"] for r in records),
        "image_bytes": sum(r["image_bytes"] for r in records),
        "image_long_side": {"min": sides[0], "median": sides[len(sides) // 2], "max": sides[-1]} if sides else {},
        "caption_chars_histogram": hist,
    }


def _finished(manifest_path: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier conversion with the same arguments whose shards are all there, else None."""
    if not manifest_path.is_file():
        return None
    try:
        old = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if old.get("params") == params and all(Path(s["url"]).is_file() for s in old.get("shards", [])):
        return old
    return None


def _run_jobs(rows: list[tuple[str, str]], root: str | Path, parts: Path, params: dict[str, Any], shard_size: int,
              num_jobs: int, resize_max_side: int, workers: int, bar: tqdm) -> None:
    """Write each job's tar and record under `parts`, skipping jobs an interrupted conversion finished."""
    parts.mkdir(parents=True, exist_ok=True)
    stamp = parts / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != params:
        shutil.rmtree(parts)  # records of a conversion with other arguments: start over
        parts.mkdir(parents=True)
    stamp.write_text(json.dumps(params))
    done = {j for j in range(num_jobs) if (parts / f"job-{j:06d}.json").is_file() and (parts / f"job-{j:06d}.tar").is_file()}
    todo = [(j, [(i, *rows[i]) for i in range(j * shard_size, min(len(rows), (j + 1) * shard_size))],
             str(root), str(parts), resize_max_side) for j in range(num_jobs) if j not in done]
    bar.update(len(done))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_job, todo):
                bar.update(1)
    else:
        for t in todo:
            _job(t)
            bar.update(1)
    bar.close()


def convert(rows: list[tuple[str, str]], root: str | Path, out_dir: str | Path, *, split: str = "train",
            shard_size: int = 10000, resize_max_side: int = 0, workers: int = 1, progress: bool = False,
            params: dict[str, Any] | None = None, source: str = "folder") -> dict[str, Any]:
    """Write `rows` (image path relative to `root`, caption) as shards; see the module doc."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if resize_max_side < 0 or workers < 1:
        raise ValueError("resize_max_side must be >= 0 and workers >= 1")
    out = Path(out_dir)
    params = {**(params or {}), "shard_size": shard_size, "resize_max_side": resize_max_side, "rows": len(rows)}
    manifest_path = out / f"{split}.json"
    if (done := _finished(manifest_path, params)) is not None:
        return done
    parts = out / f".{split}-parts"
    num_jobs = (len(rows) + shard_size - 1) // shard_size
    _run_jobs(rows, root, parts, params, shard_size, num_jobs, resize_max_side, workers,
              tqdm(total=num_jobs, desc=f"shards {split}", unit="shard", disable=not progress))
    records = [json.loads((parts / f"job-{j:06d}.json").read_text()) for j in range(num_jobs)]
    shards = []
    for stale in out.glob(f"{split}-*.tar"):
        stale.unlink()
    for rec in records:
        src = parts / f"job-{rec['job']:06d}.tar"
        if rec["count"] == 0:
            continue
        dst = out / f"{split}-{len(shards):06d}.tar"
        os.replace(src, dst)
        shards.append({"url": str(dst.resolve()), "num_samples": rec["count"]})
    stats = _stats(records, len(rows))
    (out / f"{split}_stats.json").write_text(json.dumps(stats, indent=1))
    last = max(len(shards) - 1, 0)
    manifest = {"source": source, "split": split, "num_samples": stats["samples"], "shards": shards,
                "pattern": f"{out.resolve()}/{split}-{{{0:06d}..{last:06d}}}.tar", "params": params,
                "skipped": sum(stats["skipped"].values()), "stats": f"{split}_stats.json"}
    tmp = out / f".{split}.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    shutil.rmtree(parts, ignore_errors=True)
    return manifest
