"""Shard conversion: folder + CSV/JSONL/Parquet, img2dataset folders, resize, stats, resume,
and shards that both vlp's loader and open_clip_train's loader read.

References: the rows and images this file creates (counts, sizes, captions); a conversion that
was never interrupted (for resume); open_clip_train's own get_wds_dataset (webdataset 0.2.86,
run from a separate virtual environment).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlp.data.convert as convert_mod
from tests.test_data import batches
from vlp.data.build import build_image_caption_shards, build_img2dataset_shards
from vlp.data.build import main as build_main

VENV = Path(os.environ.get("VLP_OPEN_CLIP_VENV", "/work/venv-oc"))


def make_folder(root: Path, n: int = 12) -> list[tuple[str, str]]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        w, h = (1000, 500) if i % 3 == 0 else (120, 90)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"im{i}.jpg", quality=90)
        rows.append((f"im{i}.jpg", f"caption number {i} " + "x" * (i * 7)))
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    rows += [("broken.jpg", "a broken file"), ("missing.jpg", "gone"), ("im1.jpg", "   ")]
    return rows


def test_parquet_folder_resize_and_stats(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_folder(tmp_path / "imgs")
    pq.write_table(pa.table({"file": [r[0] for r in rows], "caption": [r[1] for r in rows]}), tmp_path / "caps.parquet")
    m = build_image_caption_shards(tmp_path / "imgs", tmp_path / "caps.parquet", tmp_path / "out", shard_size=5,
                                   resize_max_side=256, workers=2)
    assert m["num_samples"] == 12 and m["skipped"] == 3 and len(m["shards"]) == 3
    stats = json.loads((tmp_path / "out" / "train_stats.json").read_text())
    assert stats["skipped"] == {"unreadable_image": 1, "missing_file": 1, "empty_caption": 1}
    assert stats["resized"] == 4 and stats["image_long_side"] == {"min": 120, "median": 120, "max": 256}
    assert sum(stats["caption_chars_histogram"].values()) == 12
    with tarfile.open(m["shards"][0]["url"]) as t:
        big = Image.open(t.extractfile("000000000.jpg"))
        assert big.size == (256, 128)  # 1000x500 shrunk, aspect kept
        assert t.extractfile("000000000.txt").read() == b"caption number 0"
    keys = sorted(k for b in batches(str(tmp_path / "out"), batch_size=1) for k in b["key"])
    assert keys == sorted(f"{i:09d}" for i in range(12))
    # CLI with JSONL gives the same samples
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows))
    assert build_main(["folder", str(tmp_path / "out2"), "--images", str(tmp_path / "imgs"), "--captions",
                       str(tmp_path / "caps.jsonl"), "--shard-size", "5", "--resize-max-side", "256",
                       "--no-progress"]) == 0
    assert json.loads((tmp_path / "out2" / "train.json").read_text())["num_samples"] == 12


def test_img2dataset_folder(tmp_path: Path) -> None:
    src = tmp_path / "i2d" / "00000"
    src.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(src / f"00000000{i}.jpg")
        (src / f"00000000{i}.txt").write_text(f"red level {i}")
        (src / f"00000000{i}.json").write_text("{}")
    m = build_img2dataset_shards(tmp_path / "i2d", tmp_path / "out", shard_size=2)
    assert m["num_samples"] == 5 and m["source"] == "img2dataset" and len(m["shards"]) == 3
    assert len([k for b in batches(str(tmp_path / "out"), batch_size=1) for k in b["key"]]) == 5


def test_interrupted_conversion_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = make_folder(tmp_path / "imgs", n=20)
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows))
    clean = build_image_caption_shards(tmp_path / "imgs", tmp_path / "caps.jsonl", tmp_path / "clean", shard_size=4)
    real, calls = convert_mod._job, []

    def dying(args):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(args[0])
        return real(args)

    monkeypatch.setattr(convert_mod, "_job", dying)
    with pytest.raises(KeyboardInterrupt):
        build_image_caption_shards(tmp_path / "imgs", tmp_path / "caps.jsonl", tmp_path / "out", shard_size=4)
    assert not (tmp_path / "out" / "train.json").exists()
    calls.clear()
    monkeypatch.setattr(convert_mod, "_job", lambda a: calls.append(a[0]) or real(a))
    m = build_image_caption_shards(tmp_path / "imgs", tmp_path / "caps.jsonl", tmp_path / "out", shard_size=4)
    assert calls == [3, 4, 5]  # only the jobs the first run did not finish
    assert m["num_samples"] == clean["num_samples"] == 20
    for a, b in zip(clean["shards"], m["shards"], strict=True):
        assert Path(a["url"]).read_bytes() == Path(b["url"]).read_bytes()


def _open_clip_python() -> Path:
    """A venv with open_clip_train's loader requirements (webdataset 0.2.86); built if missing."""
    py = VENV / "bin" / "python"
    if not py.is_file():
        try:
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True,
                           capture_output=True, timeout=300)
            subprocess.run([str(py), "-m", "pip", "install", "-q", "webdataset==0.2.86", "pandas"], check=True,
                           capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"cannot build the open_clip venv at {VENV}: {e}")
    return py


OPEN_CLIP_READ = """
import sys, json
from types import SimpleNamespace
import open_clip
from open_clip_train.data import get_wds_dataset
pattern, n = sys.argv[1], int(sys.argv[2])
args = SimpleNamespace(train_data=pattern, val_data=None, train_num_samples=n, val_num_samples=None,
                       train_data_upsampling_factors=None, dataset_resampled=False, seed=0,
                       batch_size=1, workers=0, world_size=1)
info = get_wds_dataset(args, open_clip.image_transform(32, is_train=True), is_train=True, epoch=0,
                       tokenizer=open_clip.get_tokenizer("RN50"))
print(json.dumps(sum(images.shape[0] for images, _ in info.dataloader)))
"""


def test_open_clip_reads_the_conversion(tmp_path: Path) -> None:
    py = _open_clip_python()
    rows = make_folder(tmp_path / "imgs")
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows))
    m = build_image_caption_shards(tmp_path / "imgs", tmp_path / "caps.jsonl", tmp_path / "out", shard_size=4,
                                   resize_max_side=200)
    proc = subprocess.run([str(py), "-c", OPEN_CLIP_READ, m["pattern"], str(m["num_samples"])],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == m["num_samples"] == 12
