"""Bad data of every kind is converted or skipped, counted by reason, and never stops a run;
JPEG draft decoding keeps the crop of the full-resolution image.

Reference for the counts: the corruptions this file plants, one of each (listed in PLANTED).
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tests.helpers import run
from tests.test_data import PRE, tok
from vlp.config import DataSection
from vlp.data import build_train_loader
from vlp.data.decode import SampleDecoder
from vlp.data.transforms import TrainTransform
from vlp.models.config import PreprocessConfig


def _img(mode: str, size=(40, 30), fmt="PNG", **save) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert("P")
    else:
        bands = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
        arr = rng.integers(0, 255, (*size[::-1], bands), dtype=np.uint8)
        im = Image.fromarray(arr[..., 0] if bands == 1 else arr, mode if bands != 3 else "RGB")
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


GOOD = _img("RGB", fmt="JPEG", quality=90)
# key -> (sample without key, event it must produce or None)
PLANTED: dict[str, tuple[dict, str | None]] = {
    "corrupt_jpeg": ({"jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "txt": b"x"}, "skipped:undecodable_image"),
    "truncated_jpeg": ({"jpg": GOOD[: len(GOOD) // 2], "txt": b"x"}, "skipped:undecodable_image"),
    "zero_byte_image": ({"jpg": b"", "txt": b"x"}, "skipped:empty_image"),
    "no_image": ({"txt": b"just text"}, "skipped:no_image"),
    "no_caption": ({"jpg": GOOD}, "skipped:no_caption"),
    "empty_caption": ({"jpg": GOOD, "txt": b"  \n "}, "skipped:empty_caption"),
    "huge_caption": ({"jpg": GOOD, "txt": b"word " * 200_000}, "converted:caption_truncated"),
    "not_utf8": ({"jpg": GOOD, "txt": b"caf\xe9 \xff\xfe"}, "converted:caption_not_utf8"),
    "cmyk": ({"jpg": _img("CMYK", fmt="JPEG"), "txt": b"x"}, "converted:cmyk"),
    "gray": ({"png": _img("L"), "txt": b"x"}, "converted:gray"),
    "palette": ({"png": _img("P"), "txt": b"x"}, "converted:palette"),
    "sixteen_bit": ({"png": _img("I;16"), "txt": b"x"}, "converted:16bit"),
    "alpha": ({"png": _img("RGBA"), "txt": b"x"}, "converted:alpha"),
    "tall": ({"png": _img("RGB", size=(1, 10000)), "txt": b"x"}, None),
    "wide": ({"png": _img("RGB", size=(10000, 1)), "txt": b"x"}, None),
}
GOOD_PER_SHARD = 20


def planted_counts() -> dict[str, int]:
    out: dict[str, int] = {"truncated_tar": 1, "shard_unreadable": 1}
    for _, ev in PLANTED.values():
        if ev:
            out[ev] = out.get(ev, 0) + 1
    return out


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> Path:
    """good+planted shard, a good shard, a truncated copy of it, an unreadable shard; manifest."""
    d = tmp_path_factory.mktemp("bad_shards")
    with wds.TarWriter(str(d / "a.tar")) as w:
        for i in range(GOOD_PER_SHARD):
            w.write({"__key__": f"a{i:03d}", "jpg": GOOD, "txt": f"good {i}".encode()})
        for key, (sample, _) in PLANTED.items():
            w.write({"__key__": key, **sample})
    for name in ("b", "c"):
        with wds.TarWriter(str(d / f"{name}.tar")) as w:
            for i in range(GOOD_PER_SHARD):
                w.write({"__key__": f"{name}{i:03d}", "jpg": GOOD, "txt": f"good {i}".encode()})
    data = (d / "c.tar").read_bytes()
    (d / "c.tar").write_bytes(data[: int(len(data) * 0.55)])  # cut mid-member
    (d / "d.tar").write_bytes(b"this is not a tar file" * 100)
    shards = [{"url": str(d / "a.tar"), "num_samples": GOOD_PER_SHARD + len(PLANTED)},
              {"url": str(d / "b.tar"), "num_samples": GOOD_PER_SHARD},
              {"url": str(d / "c.tar"), "num_samples": GOOD_PER_SHARD},
              {"url": str(d / "d.tar"), "num_samples": 5}]
    (d / "train.json").write_text(json.dumps({"shards": shards, "num_samples": sum(s["num_samples"] for s in shards)}))
    return d


def _readable_prefix(path: Path) -> int:
    n = 0
    try:
        with tarfile.open(path) as t:
            for m in t:
                n += m.name.endswith(".txt")
    except tarfile.TarError:
        pass
    return n


@pytest.mark.parametrize("workers", [0, 2])
def test_every_planted_corruption_is_counted_by_reason(bad_shards: Path, workers: int) -> None:
    cfg = DataSection(train_shards=str(bad_shards), batch_size=4, workers=workers, shuffle_buffer=16,
                      max_caption_chars=1000, shard_retries=1)
    events: dict[str, int] = {}
    keys: list[str] = []
    texts: list[torch.Tensor] = []
    for b in build_train_loader(cfg, tokenizer=tok, preprocess=PRE):
        for k, v in b["events"].items():
            events[k] = events.get(k, 0) + v
        keys += b["key"]
        texts.append(b["text"])
        assert b["image"].shape[1:] == (3, 16, 16) and torch.isfinite(b["image"]).all()
    assert events.pop("samples:train") == len(keys)  # one source: every sample is counted under its name
    assert events == planted_counts()
    ok = {k for k, (_, ev) in PLANTED.items() if ev is None or ev.startswith("converted:")}
    expect = 2 * GOOD_PER_SHARD + len(ok) + _readable_prefix(bad_shards / "c.tar")
    assert len(keys) == len(set(keys)) and len(keys) >= expect - 4 * max(workers, 1)
    assert not {k for k, (_, ev) in PLANTED.items() if ev and ev.startswith("skipped:")} & set(keys)


def test_caption_truncation_and_utf8_repair() -> None:
    from vlp.data.decode import decode_text

    ev: dict[str, int] = {}
    assert decode_text(b"x" * 5000, 100, ev) == "x" * 100
    assert decode_text(b"caf\xe9", 100, ev) == "caf\ufffd"
    assert decode_text(b"", 100, ev) is None and decode_text(None, 100, ev) is None
    assert ev == {"converted:caption_truncated": 1, "converted:caption_not_utf8": 1,
                  "skipped:empty_caption": 1, "skipped:no_caption": 1}


def test_sixteen_bit_and_alpha_are_scaled_not_clipped() -> None:
    from vlp.data.decode import to_rgb_counted

    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb_counted(Image.fromarray(arr), {}))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]  # a plain convert("RGB") clips to 255
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    assert np.asarray(to_rgb_counted(rgba, {}))[0, 0].tolist() == [255, 255, 255]  # over white


def test_planted_set_trains_to_completion_and_reports_counts(tmp_path: Path, bad_shards: Path) -> None:
    run_dir = tmp_path / "robust"
    proc = run([sys.executable, "train.py", "--config", "tests/configs/resume_nano.yaml", f"run_dir={run_dir}",
                f"data.train_shards={bad_shards}/train.json", "data.batch_size=4", "data.workers=1",
                "data.max_caption_chars=1000", "data.shard_retries=1", "train.steps=30",
                "data.log_consumed_keys=false"], timeout=600)
    assert (run_dir / "model.safetensors").is_file()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_epoch = next(r for r in rows if r.get("epoch_end") == 0)
    counts = {k[5:]: v for k, v in first_epoch.items() if k.startswith("data/") and "samples:" not in k}
    assert counts == planted_counts(), proc.stdout[-2000:]
    assert "epoch 0 data: " in proc.stdout


def test_draft_decode_keeps_the_full_image_crop() -> None:
    """A 1600 px JPEG cropped to 64 px: decoding at 1/8 scale gives nearly the same pixels as a
    full decode, because the crop box is drawn in full-image coordinates and mapped."""
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((1600, 1200), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=92)
    t = TrainTransform(PreprocessConfig(image_size=64), crop_scale=(0.3, 1.0))
    for seed in range(5):
        full = t.crop(Image.open(io.BytesIO(buf.getvalue())), seed, draft=False).float()
        img = Image.open(io.BytesIO(buf.getvalue()))
        drafted = t.crop(img, seed, draft=True).float()
        assert img.size[0] < 1600  # really decoded at a reduced scale
        other = t.crop(Image.open(io.BytesIO(buf.getvalue())), seed + 100, draft=False).float()
        assert (full - drafted).abs().mean() < 4.0  # of 255: resampling noise only
        assert (full - other).abs().mean() > 5 * (full - drafted).abs().mean()  # a different crop is far
    # the decoder drafts only JPEGs it has not loaded; PNGs take the full path
    dec = SampleDecoder(t, ["jpg"], lambda s, ev: "x", lambda k: 0, draft=True)
    assert dec({"__key__": "k", "jpg": buf.getvalue()}, {})["image"].shape == (3, 64, 64)
