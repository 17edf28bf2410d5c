"""`python -m vlp.data.build manifest`: counts of shard sets vlp did not write (issue 17, part 3).

Reference counts: webdataset's own reader over the same tars; for a truncated tar, the samples
the trainer's reader yields from it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import webdataset as wds

from tests.helpers import run
from vlp.data.position import iter_shard


def _wds_count(url: str) -> int:
    return sum(1 for _ in wds.WebDataset(url, shardshuffle=False))


def _manifest(*args: str, check: bool = True):
    return run([sys.executable, "-m", "vlp.data.build", "manifest", *args], check=check)


@pytest.fixture()
def img2dataset_dir(tmp_path, digits_shards_dir) -> Path:
    """An img2dataset webdataset output: NNNNN.tar with NNNNN_stats.json beside some of them."""
    out = tmp_path / "img2dataset"
    out.mkdir()
    for i, tar in enumerate(sorted(digits_shards_dir.glob("train-*.tar"))[:3]):
        shutil.copy(tar, out / f"{i:05d}.tar")
    for i in (0, 2):
        n = _wds_count(str(out / f"{i:05d}.tar"))
        (out / f"{i:05d}_stats.json").write_text(json.dumps({"count": n + 3, "successes": n, "failed_to_download": 3}))
    return out


def test_img2dataset_folder_counts_from_stats_and_headers(tmp_path, img2dataset_dir):
    out = tmp_path / "m.json"
    proc = _manifest(f"{img2dataset_dir}/{{00000..00002}}.tar", str(out), "--workers", "2")
    m = json.loads(out.read_text())
    expected = [_wds_count(str(img2dataset_dir / f"{i:05d}.tar")) for i in range(3)]
    assert [s["num_samples"] for s in m["shards"]] == expected
    assert m["num_samples"] == sum(expected) and f"{sum(expected)} samples in 3 shards" in proc.stdout
    assert m["counted_from"] == {"img2dataset stats": 2, "tar headers": 1}
    no_stats = tmp_path / "headers.json"
    _manifest(f"{img2dataset_dir}/{{00000..00002}}.tar", str(no_stats), "--no-stats")
    assert [s["num_samples"] for s in json.loads(no_stats.read_text())["shards"]] == expected


def test_sizes_json_and_a_pipe_spec(tmp_path, digits_shards_dir):
    tars = sorted(digits_shards_dir.glob("train-*.tar"))
    expected = [_wds_count(str(t)) for t in tars]
    pipe = f"pipe:cat {digits_shards_dir}/train-{{000000..{len(tars) - 1:06d}}}.tar"
    out = tmp_path / "pipe.json"
    _manifest(pipe, str(out))
    m = json.loads(out.read_text())
    assert [s["num_samples"] for s in m["shards"]] == expected and m["counted_from"] == {"streamed": len(tars)}
    assert m["shards"][0]["url"] == f"pipe:cat {digits_shards_dir}/train-000000.tar"
    copy = tmp_path / "sized"
    copy.mkdir()
    for t in tars[:2]:
        shutil.copy(t, copy / t.name)
    (copy / "sizes.json").write_text(json.dumps({t.name: n for t, n in zip(tars[:2], expected)}))
    out2 = tmp_path / "sized.json"
    _manifest(f"{copy}/train-{{000000..000001}}.tar", str(out2))
    assert json.loads(out2.read_text())["counted_from"] == {"sizes.json": 2}


def test_training_on_the_manifest_never_counts_again(tmp_path, digits_shards_dir, monkeypatch):
    import vlp.data.pipeline as pipeline

    out = tmp_path / "pipe.json"
    _manifest(f"pipe:cat {digits_shards_dir}/train-{{000000..000007}}.tar", str(out))

    def no_counting(url):
        raise AssertionError(f"counted {url} again")

    monkeypatch.setattr(pipeline, "_counted", no_counting)
    table = pipeline.shard_table(str(out))
    assert sum(table.sizes) == json.loads(out.read_text())["num_samples"] == 1500
    assert pipeline.num_samples_from_manifest(str(out)) == 1500  # epochs turn into steps without a data.train_num_samples


def test_unreadable_and_truncated_shards(tmp_path, digits_shards_dir):
    tars = sorted(digits_shards_dir.glob("train-*.tar"))
    d = tmp_path / "bad"
    d.mkdir()
    shutil.copy(tars[0], d / "a.tar")
    data = tars[1].read_bytes()
    (d / "b.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    (d / "c.tar").write_bytes(b"not a tar at all" * 100)
    proc = _manifest(f"{d}/{{a,b,c}}.tar", str(tmp_path / "m.json"), check=False)
    assert proc.returncode == 2 and "1 of 3 shards cannot be read" in proc.stderr and f"{d}/c.tar" in proc.stderr
    assert not (tmp_path / "m.json").exists()
    proc = _manifest(f"{d}/{{a,b,c}}.tar", str(tmp_path / "m.json"), "--skip-unreadable")
    m = json.loads((tmp_path / "m.json").read_text())
    assert [Path(s["url"]).name for s in m["shards"]] == ["a.tar", "b.tar"]
    yielded = sum(1 for _ in iter_shard(str(d / "b.tar")))  # what training reads from the cut tar
    assert m["shards"][1]["num_samples"] == yielded > 0
    assert m["truncated"] == [str(d / "b.tar")] and len(m["unreadable"]) == 1
    assert "warning: 1 truncated shard(s)" in proc.stderr
