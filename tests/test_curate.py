"""Curation (issue 15): the noise protocol, scoring (1 process = 2 under torchrun, a killed job resumes),
selection rules, and training on a selection (never a sample outside it; exact resume).

References: the clean shards themselves (noise), a single-process scoring run (torchrun, resume),
hand-computed cuts (rules), the selection's own key list and an uninterrupted run (training).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, child_env, run, torchrun
from tests.test_resume import all_keys
from tests.test_resume import args as resume_args
from tests.test_resume import train as train_run
from tests.test_train import assert_same_weights, weights
from vlp.curate.noise import corrupted_keys, make_noisy
from vlp.curate.score import read_scores, score_shards
from vlp.curate.select import gmm_posterior, grouped_rule_keep, rule_keep, select
from vlp.data.manifest import DataError
from vlp.data.position import iter_shard
from vlp.data.selection import Selection, write_selection


def _members(spec_dir: Path) -> dict[str, dict]:
    manifest = json.loads((spec_dir / "train.json").read_text())
    return {raw["__key__"]: raw for s in manifest["shards"] for _, raw in iter_shard(s["url"])}


def test_noise_permutes_the_captions_of_exactly_the_chosen_fraction(tmp_path, digits_shards_dir):
    make_noisy(str(digits_shards_dir / "train.json"), tmp_path / "noisy", rate=0.4, seed=3)
    clean, noisy = _members(digits_shards_dir), _members(tmp_path / "noisy")
    assert list(clean) == list(noisy)  # same keys, same order
    assert all(clean[k]["png"] == noisy[k]["png"] and clean[k]["cls"] == noisy[k]["cls"] for k in clean)
    changed = {k for k in clean if clean[k]["txt"] != noisy[k]["txt"]}
    assert changed == corrupted_keys(tmp_path / "noisy")
    meta = json.loads((tmp_path / "noisy" / "corrupted.json").read_text())
    assert meta["chosen"] == 600 and 560 <= len(changed) <= 600  # a caption may land on its own sample
    assert sorted(v["txt"] for v in clean.values()) == sorted(v["txt"] for v in noisy.values())  # permuted


def test_the_bench_oracle_keeps_exactly_the_intact_pairs_in_uid_order(tmp_path, digits_shards_dir):
    """bench/noisy_pairs.py's oracle row (the bound of selection) trains on every pair the noise left in place."""
    sys.path.insert(0, str(ROOT / "bench"))
    from noisy_pairs import oracle_selection

    make_noisy(str(digits_shards_dir / "train.json"), tmp_path / "noisy", rate=0.5, seed=1)
    bad = corrupted_keys(tmp_path / "noisy")
    sel = Selection(oracle_selection(tmp_path / "noisy", bad, tmp_path / "oracle"))
    manifest = json.loads((tmp_path / "noisy" / "train.json").read_text())
    for i, shard in enumerate(manifest["shards"]):
        keys = [raw["__key__"] for _, raw in iter_shard(shard["url"])]
        assert sel.kept_in(i).tolist() == [k not in bad for k in keys]
    assert sel.kept == manifest["num_samples"] - len(bad) and 0 < len(bad)


def _random_checkpoint(tmp_path_factory, name: str) -> Path:
    """A random-init preset exported as vlp weights (scoring and recaptioning need no trained model)."""
    from vlp.models import build_model, get_model_config
    from vlp.train.checkpoint import export_weights

    torch.manual_seed(0)
    cfg = get_model_config(name)
    out = tmp_path_factory.mktemp(name)
    export_weights(build_model(cfg).state_dict(), cfg, name, out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _random_checkpoint(tmp_path_factory, "clip-nano")


def _table(scores: Path):
    table, _ = read_scores(scores)
    return table.to_pydict()


@pytest.mark.slow
def test_scoring_under_torchrun_equals_one_process_and_a_killed_job_resumes(tmp_path, digits_shards_dir, checkpoint):
    spec = str(digits_shards_dir / "train.json")
    res = score_shards(spec, str(checkpoint), tmp_path / "one", batch_size=64, embeddings=True)
    assert res["scored"] == 1500
    one = _table(tmp_path / "one")
    assert one["uid"] == list(range(1500)) and one["key"] == list(_members(digits_shards_dir))
    # the score is the cosine of the stored embeddings
    img, txt = np.array(one["image_emb"], np.float32), np.array(one["text_emb"], np.float32)
    assert np.allclose((img * txt).sum(1), one["score"], atol=2e-3)

    torchrun(2, "-m", "vlp.curate", "score", spec, str(tmp_path / "two"), "--checkpoint", str(checkpoint),
             "--batch-size", "64", "--embeddings", "--workers", "1")
    assert _table(tmp_path / "two") == one  # row for row, bit for bit

    # a job killed after its first shards: started again, it skips them and ends equal
    cmd = [sys.executable, "-m", "vlp.curate", "score", spec, str(tmp_path / "killed"), "--checkpoint",
           str(checkpoint), "--batch-size", "64", "--embeddings", "--workers", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + 120
    while len(list(shards.glob("*.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.parquet")}
    assert 2 <= len(done) < 8, f"{len(done)} shards finished before the kill"
    with pytest.raises(DataError, match="not finished"):
        read_scores(tmp_path / "killed")
    out = run(cmd).stdout
    assert f"({len(done)} already done)" in out
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("*.parquet") if p.name in done} == done
    assert _table(tmp_path / "killed") == one


def test_selection_rules_against_hand_computed_cuts():
    s = np.array([0.1, 0.5, 0.3, 0.9, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0], np.float32)
    keep, found = rule_keep(s, "top", fraction=0.3)
    assert keep.tolist() == [s_ >= 0.7 for s_ in s] and found["cut"] == pytest.approx(0.7)
    keep, _ = rule_keep(s, "threshold", min_score=0.45)
    assert keep.sum() == 5 and not keep[7] and keep[1]
    rng = np.random.default_rng(0)
    bad, good = rng.normal(0.10, 0.02, 700), rng.normal(0.30, 0.03, 300)
    keep, found = rule_keep(np.concatenate([bad, good]).astype(np.float32), "gmm")
    # the Bayes cut of these two Gaussians lies near 0.19: at most a handful on the wrong side
    assert keep[:700].sum() <= 3 and keep[700:].sum() >= 297
    assert found["means"][found["clean_component"]] == pytest.approx(0.30, abs=0.01)
    with pytest.raises(DataError, match="unknown selection rule"):
        rule_keep(s, "median")


def test_a_per_entry_rule_without_a_score_rule_is_refused_before_work_starts(tmp_path, capsys):
    from vlp.curate.select import main as select_main

    # the scores directory does not exist: the refusal must come first, and nothing is written
    assert select_main([str(tmp_path / "no-scores"), str(tmp_path / "out"), "--rule", "none",
                        "--per-entry-rule", "entries.txt"]) == 2
    err = capsys.readouterr().err
    assert "--per-entry-rule entries.txt" in err and "--rule none" in err and "no-scores" not in err
    assert not (tmp_path / "out").exists()


def _selection(tmp_path: Path, shards: Path, checkpoint: Path, name: str, fraction: float) -> Path:
    scores = tmp_path / "scores"
    if not (scores / "scoring.json").is_file():
        score_shards(str(shards / "train.json"), str(checkpoint), scores, batch_size=128)
    select(scores, tmp_path / name, "top", fraction=fraction)
    return tmp_path / name


@pytest.mark.slow
def test_training_on_a_selection_reads_nothing_outside_it_and_resumes_exactly(tmp_path, digits_shards_dir, checkpoint):
    import pyarrow.parquet as pq

    from vlp.config import load_config
    from vlp.train.trainer import resolve_total_steps

    sel = _selection(tmp_path, digits_shards_dir, checkpoint, "sel", fraction=0.6)
    kept = set(pq.read_table(sel / "selection.parquet")["key"].to_pylist())
    assert len(kept) == Selection(sel).kept >= 900
    # an epoch is the selection: epochs -> steps counts the kept samples, not the shards'
    cfg = load_config(ROOT / "tests/configs/resume_nano.yaml", [f"data.train_shards={digits_shards_dir}/train.json",
                                                              f"data.select={sel}", "train.steps=0"])
    assert resolve_total_steps(cfg, 2, "") == len(kept) // 50
    # 12 steps stay inside epoch 0 (each of the 4 slots holds about 225 kept samples, >= 7 batches)
    extra = {"data.select": sel, "train.steps": 12}
    train_run(2, tmp_path / "full", digits_shards_dir, **extra)
    keys = all_keys(tmp_path / "full")
    assert set(keys) <= kept and len(keys) == len(set(keys)) == 12 * 50
    meta = json.loads(next((tmp_path / "full" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["selections"] == {"train": Selection(sel).fingerprint}
    # stopped inside the epoch and resumed: the same keys and weights as the uninterrupted run
    train_run(2, tmp_path / "cut", digits_shards_dir, **extra, **{"train.stop_after_steps": 5})
    train_run(2, tmp_path / "cut", digits_shards_dir, resume=True, **extra)
    assert all_keys(tmp_path / "cut") == keys
    assert_same_weights(weights(tmp_path / "cut"), weights(tmp_path / "full"))


@pytest.mark.slow
def test_a_changed_or_foreign_selection_is_refused_before_work_starts(tmp_path, digits_shards_dir, checkpoint):
    sel = _selection(tmp_path, digits_shards_dir, checkpoint, "sel", fraction=0.6)
    extra = {"data.select": sel, "train.steps": 8, "data.log_consumed_keys": "false"}
    train_run(1, tmp_path / "cut", digits_shards_dir, **extra, **{"train.stop_after_steps": 3})
    _selection(tmp_path, digits_shards_dir, checkpoint, "sel", fraction=0.5)  # rewritten in place
    proc = run([sys.executable, "train.py", *resume_args(tmp_path / "cut", digits_shards_dir, **extra),
                "--resume", "latest"], check=False)
    assert proc.returncode != 0 and "stopped inside epoch 0 reading source 'train' with selection" in proc.stderr
    # a selection made for other shards is named, before training
    other = tmp_path / "other"
    make_noisy(str(digits_shards_dir / "train.json"), other, rate=0.0)
    (other / "train-000007.tar").unlink()
    manifest = json.loads((other / "train.json").read_text())
    manifest["shards"] = manifest["shards"][:7]
    (other / "train.json").write_text(json.dumps(manifest))
    proc = run([sys.executable, "train.py", *resume_args(tmp_path / "x", other, **extra)], check=False)
    assert proc.returncode != 0 and "data.select: selection" in proc.stderr and "7 shards" in proc.stderr


def test_balance_matches_whole_words_and_caps_head_entries():
    from vlp.curate.rules import balance_keep, match_entries

    got = match_entries(["A black Cat on a mat", "concatenate", "New York city", "york", "new  york!"],
                        ["cat", "new york", "mat"])
    assert got == [[0, 2], [], [1], [], [1]]
    captions = ["a photo of a dog"] * 1000 + ["an axolotl"] * 30 + ["nothing known"] * 5
    uids = np.arange(len(captions))
    keep, info = balance_keep(captions, uids, ["dog", "axolotl"], per_entry=100, seed=1)
    assert keep[1000:1030].all() and not keep[1030:].any()  # tail kept whole, unmatched dropped
    assert 70 <= keep[:1000].sum() <= 130  # head: each kept with p = 100 / 1000
    assert info["head"][0] == {"entry": "dog", "matched": 1000, "kept": int(keep[:1000].sum())}
    again, _ = balance_keep(captions, uids, ["dog", "axolotl"], per_entry=100, seed=1)
    assert (again == keep).all()  # draws seeded per uid


def test_per_entry_rule_cuts_inside_each_entry_group():
    from vlp.curate.rules import group_of
    from vlp.curate.select import grouped_rule_keep

    # dogs score high, cats low (an easy and a hard concept); "dog and cat" goes to the rarer cat;
    # "emu" has too few samples and is pooled; "nothing" matches no entry
    captions = ["a dog"] * 6 + ["a cat"] * 3 + ["a dog and a cat"] + ["an emu"] * 2 + ["nothing"] * 4
    group, names = group_of(captions, ["dog", "cat", "emu"], min_group=3)
    assert [names[g] for g in group] == (["dog"] * 6 + ["cat"] * 4 + ["<small entries>"] * 2 + ["<no entry>"] * 4)
    s = np.array([.9, .8, .7, .6, .5, .4, .3, .2, .1, .0, .5, .4, .3, .2, .1, .0], np.float32)
    keep, found = grouped_rule_keep(s, group, names, "top", fraction=0.5)
    assert np.flatnonzero(keep).tolist() == [0, 1, 2, 6, 7, 10, 12, 13]  # the top half of every group
    assert found["groups"] == 4 and found["largest"]["cat"] == {"samples": 4, "kept": 2, "fraction": 0.5,
                                                                "cut": pytest.approx(0.2)}
    assert rule_keep(s, "top", fraction=0.5)[0][6:10].sum() == 0  # one pool-wide cut keeps no cat


def test_caption_rules_read_per_shard_and_split_over_ranks_equal_the_rules_on_the_whole_table(
        tmp_path, digits_shards_dir, checkpoint):
    """`select` holds only uid and score whole; the caption filters (length, balancing) and the per-entry
    rule read the captions one scoring shard at a time, each rank its own shards. One process and
    `torchrun --nproc_per_node=2` must give what the in-memory rules give on the whole caption column."""
    import pyarrow.parquet as pq

    from vlp.curate.rules import balance_keep, group_of

    score_shards(str(digits_shards_dir / "train.json"), str(checkpoint), tmp_path / "scores", batch_size=128)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "handwritten", "photo",
             *map(str, range(10))]
    (tmp_path / "entries.txt").write_text("\n".join(names) + "\n")
    entries_file = str(tmp_path / "entries.txt")
    # the reference: every rule on the whole table in memory
    table, _ = read_scores(tmp_path / "scores", ["uid", "key", "score", "caption", "caption_words"])
    captions, uid = table["caption"].to_pylist(), table["uid"].to_numpy()
    scores = table["score"].to_numpy().astype(np.float32)
    group, groups = group_of(captions, names, min_group=30)
    by_group, _ = grouped_rule_keep(scores, group, groups, "top", fraction=0.6)
    balanced, info = balance_keep(captions, uid, names, per_entry=40, seed=0)
    want = by_group & balanced & (table["caption_words"].to_numpy() >= 3)
    assert 0 < want.sum() < by_group.sum() and info["head"][0]["matched"] > 40  # every rule removes something
    kw = dict(fraction=0.6, per_entry_rule=entries_file, min_group=30, balance=entries_file, per_entry=40,
              min_caption_words=3)
    one = select(tmp_path / "scores", tmp_path / "one", "top", **kw)
    torchrun(2, "-m", "vlp.curate", "select", str(tmp_path / "scores"), str(tmp_path / "two"), "--rule", "top",
             "--fraction", "0.6", "--per-entry-rule", entries_file, "--min-group", "30", "--balance", entries_file,
             "--per-entry", "40", "--min-caption-words", "3")
    for d in ("one", "two"):
        got = pq.read_table(tmp_path / d / "selection.parquet")
        assert got["uid"].to_pylist() == uid[want].tolist()
        assert got["key"].to_pylist() == [k for k, w in zip(table["key"].to_pylist(), want) if w]
        report = json.loads((tmp_path / d / "report.json").read_text())
        assert report["found"]["balance"] == info and report["counts"]["kept"] == int(want.sum())
    assert json.loads((tmp_path / "two" / "selection.json").read_text())["fingerprint"] == one["fingerprint"]
    assert not list((tmp_path / "two").glob(".*"))  # the ranks' exchange directories are gone


def test_semdedup_removes_planted_near_duplicates_and_keeps_one_of_each():
    from vlp.curate.rules import semdedup_keep

    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 32)).astype(np.float32)
    copies = np.repeat(base[:10], 3, axis=0) + 1e-3 * rng.normal(size=(30, 32)).astype(np.float32)
    emb = np.concatenate([base, copies])
    keep, info = semdedup_keep(emb, eps=0.01, clusters=4)
    assert info["removed"] == 30 and keep[10:60].all()
    for g in range(10):  # of base[g] and its three copies exactly one stays
        assert keep[[g, 60 + 3 * g, 61 + 3 * g, 62 + 3 * g]].sum() == 1


def test_semdedup_streamed_in_several_passes_equals_the_in_memory_run():
    from vlp.curate.rules import semdedup_keep, semdedup_stream

    rng = np.random.default_rng(2)
    base = rng.normal(size=(400, 24)).astype(np.float32)
    copies = np.repeat(base[:40], 2, axis=0) + 1e-3 * rng.normal(size=(80, 24)).astype(np.float32)
    emb = rng.permutation(np.concatenate([base, copies]))
    whole, info = semdedup_keep(emb, eps=0.01, clusters=6, seed=3)
    cuts = [0, 7, 7, 130, 131, 300, 480]  # uneven scoring shards, one with no rows
    shards = [lambda a=a, b=b: emb[a:b] for a, b in zip(cuts, cuts[1:])]
    streamed, sinfo = semdedup_stream(shards, np.diff(cuts).tolist(), eps=0.01, clusters=6, seed=3, max_rows=90)
    assert streamed.tolist() == whole.tolist() and info["removed"] == sinfo["removed"] == 80  # 2 of each 3
    assert sinfo["buckets"] > 3 and info["buckets"] == 1  # spilled to several buckets, against one in memory


def test_semdedup_under_torchrun_equals_one_process(tmp_path, digits_shards_dir, checkpoint):
    """`torchrun --nproc_per_node=2 -m vlp.curate select --dedup-eps`: the k-means sample (4 clusters: a
    sample of the rows, not all), the assignment and the buckets split over 2 ranks (files through the
    output directory) give the one-process selection bit for bit, spilled to several buckets or not; the
    spill directory is removed. (With every row in the sample, the test above ties the rule to the
    whole column held in memory.)"""
    import pyarrow.parquet as pq

    score_shards(str(digits_shards_dir / "train.json"), str(checkpoint), tmp_path / "scores", batch_size=128,
                 embeddings=True)
    one = select(tmp_path / "scores", tmp_path / "one", "none", dedup_eps=0.05, dedup_clusters=4)
    small = select(tmp_path / "scores", tmp_path / "small", "none", dedup_eps=0.05, dedup_clusters=4,
                   dedup_bucket_rows=150)
    torchrun(2, "-m", "vlp.curate", "select", str(tmp_path / "scores"), str(tmp_path / "two"), "--rule", "none",
             "--dedup-eps", "0.05", "--dedup-clusters", "4", "--dedup-bucket-rows", "400")
    two = json.loads((tmp_path / "two" / "selection.json").read_text())
    found = [json.loads((tmp_path / d / "report.json").read_text())["found"]["semdedup"] for d in ("one", "small", "two")]
    assert found[0]["buckets"] == 1 and found[1]["buckets"] > 1 and found[2]["buckets"] >= 2  # each path taken
    assert 0 < found[0]["removed"] == found[1]["removed"] == found[2]["removed"]
    assert one["fingerprint"] == small["fingerprint"] == two["fingerprint"] and one["kept"] == two["kept"] < 1500
    assert pq.read_table(tmp_path / "two" / "selection.parquet").equals(pq.read_table(tmp_path / "one" / "selection.parquet"))
    assert not (tmp_path / "two" / ".semdedup-spill").exists()
    with pytest.raises(ValueError, match="--dedup-bucket-rows 0: must be at least 1"):  # before any work
        select(tmp_path / "scores", tmp_path / "bad", "none", dedup_eps=0.05, dedup_bucket_rows=0)
    assert not (tmp_path / "bad").exists()


def test_decontamination_removes_exactly_what_a_brute_force_search_finds():
    from vlp.curate.rules import decontaminate_keep

    rng = np.random.default_rng(1)
    ev = rng.normal(size=(40, 16)).astype(np.float32)
    pool = rng.normal(size=(300, 16)).astype(np.float32)
    planted = [7, 50, 123, 299]
    pool[planted] = ev[[3, 3, 20, 39]] * 2.5 + 1e-3 * rng.normal(size=(4, 16)).astype(np.float32)
    keys = [f"k{i}" for i in range(300)]
    chunks = [(a, pool[a:b], keys[a:b]) for a, b in ((0, 100), (100, 101), (101, 300))]  # uneven scoring shards
    keep, info = decontaminate_keep(chunks, 300, ev, [f"e{j}" for j in range(40)], min_sim=0.9)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    nearest = (unit(pool) @ unit(ev).T).max(1)
    assert keep.tolist() == (nearest < 0.9).tolist() and not keep[planted].any()
    assert info["removed"] == int((nearest >= 0.9).sum()) and info["eval_images"] == 40
    assert {c["key"]: c["eval_key"] for c in info["closest"]}["k123"] == "e20"
    assert [c["cosine"] for c in info["closest"]] == sorted((c["cosine"] for c in info["closest"]), reverse=True)
    with pytest.raises(DataError, match="min-sim"):
        decontaminate_keep(chunks, 300, ev, [], min_sim=1.5)
    with pytest.raises(DataError, match=r"would remove 100.0% of the pool"):  # a cut that tells nothing apart
        decontaminate_keep(chunks, 300, ev, [f"e{j}" for j in range(40)], min_sim=-1.0)
    assert decontaminate_keep(chunks, 300, ev, [f"e{j}" for j in range(40)], min_sim=-1.0, max_removed=1.0)[0].sum() == 0


def _contaminated_pool(tmp_path: Path, train: Path, test: Path, planted: int) -> tuple[Path, list[str]]:
    """The train shards plus one shard of `planted` evaluation images under new keys (a scraped copy)."""
    import webdataset as wds

    manifest = json.loads((train / "train.json").read_text())
    copies = [raw for _, (_, raw) in zip(range(planted), iter_shard(json.loads(
        (test / "test.json").read_text())["shards"][0]["url"]))]
    keys = [f"scraped_{i:03d}" for i in range(planted)]
    with wds.TarWriter(str(tmp_path / "scraped.tar")) as w:
        for key, raw in zip(keys, copies):
            w.write({"__key__": key, "png": raw["png"], "txt": b"a photo found on the web"})
    manifest["shards"].append({"url": str(tmp_path / "scraped.tar"), "num_samples": planted})
    manifest["num_samples"] += planted
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "train.json").write_text(json.dumps(manifest))
    return tmp_path / "pool", keys


def test_select_decontaminates_against_a_scored_evaluation_set(tmp_path, digits_shards_dir, checkpoint,
                                                              coca_checkpoint):
    """Real held-out images (digits' test split) planted in the pool are dropped, and exactly the samples a
    brute-force search over the stored embeddings finds; mismatched inputs are refused before any work."""
    import pyarrow.parquet as pq

    from vlp.data.build import build_shards

    build_shards("digits", tmp_path / "test", split="test", shard_size=200, seed=0)
    pool, planted = _contaminated_pool(tmp_path, digits_shards_dir, tmp_path / "test", planted=6)
    score_shards(str(pool / "train.json"), str(checkpoint), tmp_path / "pool_scores", batch_size=128, embeddings=True)
    score_shards(str(tmp_path / "test" / "test.json"), str(checkpoint), tmp_path / "eval_scores", batch_size=128,
                 embeddings=True)
    sel = select(tmp_path / "pool_scores", tmp_path / "sel", "none", decontaminate=[tmp_path / "eval_scores"],
                 decontaminate_min_sim=0.999)
    pool_t, eval_t = _table(tmp_path / "pool_scores"), _table(tmp_path / "eval_scores")
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    nearest = (unit(np.array(pool_t["image_emb"], np.float32)) @ unit(np.array(eval_t["image_emb"], np.float32)).T)
    removed = {k for k, m in zip(pool_t["key"], nearest.max(1)) if m >= 0.999}
    kept = set(pq.read_table(tmp_path / "sel" / "selection.parquet")["key"].to_pylist())
    assert removed == set(planted) and kept == set(pool_t["key"]) - removed  # the copies, and nothing else
    assert sel["kept"] == len(pool_t["key"]) - len(removed) == sel["counts"]["kept_by_decontamination"]
    found = json.loads((tmp_path / "sel" / "report.json").read_text())["found"]["decontamination"]
    assert found["removed"] == len(removed) and found["eval_images"] == len(eval_t["key"])
    # under torchrun each rank searches its own pool shards: the same selection and the same closest pairs
    torchrun(2, "-m", "vlp.curate", "select", str(tmp_path / "pool_scores"), str(tmp_path / "two"), "--rule", "none",
             "--decontaminate", str(tmp_path / "eval_scores"), "--decontaminate-min-sim", "0.999")
    assert json.loads((tmp_path / "two" / "selection.json").read_text())["fingerprint"] == sel["fingerprint"]
    assert json.loads((tmp_path / "two" / "report.json").read_text())["found"]["decontamination"] == found
    # SemDeDup streams the same embeddings per scoring shard: equal to the in-memory rule, row for row
    from vlp.curate.rules import semdedup_keep

    select(tmp_path / "pool_scores", tmp_path / "dedup", "none", dedup_eps=0.05, dedup_clusters=8)
    whole, _ = semdedup_keep(np.array(pool_t["image_emb"], np.float32), 0.05, 8)
    kept = set(pq.read_table(tmp_path / "dedup" / "selection.parquet")["key"].to_pylist())
    assert 0 < len(kept) < len(pool_t["key"]) and kept == {k for k, w in zip(pool_t["key"], whole) if w}

    # a filter registered from user code is one more `select` keyword (and flag), ANDed with the others
    from vlp.curate.filters import Filter, Option, register_filter
    from vlp.curate.filters.registry import _REGISTRY
    from vlp.curate.select import _parser

    class EvenUids(Filter):
        name, options = "even_uids", (Option("even_uids", False, "keep even uids only", action="store_true"),)

        def active(self, o):
            return o["even_uids"]

        def keep(self, ctx, o):
            return ctx.uid % 2 == 0, {"odd": int((ctx.uid % 2).sum())}

    register_filter(EvenUids())
    try:
        assert _parser().parse_args(["s", "o", "--even-uids"]).even_uids
        sel = select(tmp_path / "pool_scores", tmp_path / "even", "none", even_uids=True, dedup_eps=0.05,
                     dedup_clusters=8)
        got = set(pq.read_table(tmp_path / "even" / "selection.parquet")["uid"].to_pylist())
        uids = dict(zip(pool_t["key"], pool_t["uid"]))
        assert got == {uids[k] for k in kept if uids[k] % 2 == 0} and sel["counts"]["kept_by_even_uids"] == len(
            [u for u in pool_t["uid"] if u % 2 == 0])
        with pytest.raises(ValueError, match="option dedup_eps belongs to filter 'semdedup'"):
            register_filter(type("Clash", (EvenUids,), {"name": "clash", "options": (Option("dedup_eps", 0, ""),)})())
    finally:
        _REGISTRY.pop("even_uids", None)
    with pytest.raises(ValueError, match="unknown option even_uids"):
        select(tmp_path / "pool_scores", tmp_path / "never", "none", even_uids=True)

    score_shards(str(pool / "train.json"), str(checkpoint), tmp_path / "bare", batch_size=256)
    score_shards(str(tmp_path / "test" / "test.json"), str(coca_checkpoint), tmp_path / "other", batch_size=128,
                 embeddings=True)
    for pool_dir, eval_dir, says in (("bare", "eval_scores", "without --embeddings"),
                                     ("pool_scores", "other", "only comparable in one model")):
        with pytest.raises(DataError, match=says):
            select(tmp_path / pool_dir, tmp_path / "never", "gmm", decontaminate=[tmp_path / eval_dir])
    with pytest.raises(DataError, match="must be a cosine"):
        select(tmp_path / "pool_scores", tmp_path / "never", "gmm", decontaminate=[tmp_path / "eval_scores"],
               decontaminate_min_sim=95)
    assert not (tmp_path / "never").exists()


def test_reshard_writes_exactly_the_selected_samples_byte_for_byte(tmp_path, digits_shards_dir, checkpoint):
    import pyarrow.parquet as pq

    from vlp.data.manifest import num_samples_from_manifest

    sel = _selection(tmp_path, digits_shards_dir, checkpoint, "sel", fraction=0.25)
    proc = run([sys.executable, "-m", "vlp.data.build", "reshard", str(digits_shards_dir / "train.json"), str(sel),
                str(tmp_path / "out"), "--shard-size", "100"])
    kept = pq.read_table(sel / "selection.parquet")["key"].to_pylist()
    assert f"{len(kept)} samples in" in proc.stdout
    clean, new = _members(digits_shards_dir), _members(tmp_path / "out")
    assert list(new) == kept  # the source's order, nothing else
    assert all(new[k] == clean[k] for k in kept)
    assert num_samples_from_manifest(str(tmp_path / "out" / "train.json")) == len(kept)
    # under torchrun each rank writes every other output shard: the same files, byte for byte
    torchrun(2, "-m", "vlp.data.build", "reshard", str(digits_shards_dir / "train.json"), str(sel),
             str(tmp_path / "two"), "--shard-size", "100")
    one = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert len(one) == -(-len(kept) // 100) > 2 and sorted(p.name for p in (tmp_path / "two").glob("*.tar")) == one
    assert all((tmp_path / "two" / n).read_bytes() == (tmp_path / "out" / n).read_bytes() for n in one)
    shards = lambda d: [(Path(x["url"]).name, x["num_samples"]) for x in json.loads((d / "train.json").read_text())["shards"]]  # noqa: E731
    assert shards(tmp_path / "two") == shards(tmp_path / "out")
    assert not list((tmp_path / "two").glob(".*"))  # no temporary files or rank exchange left
    # a source shard cut short (a moved copy of the shards: names match the selection) is named, not hidden
    import shutil

    from vlp.data.build import reshard

    shutil.copytree(digits_shards_dir, tmp_path / "cut")
    manifest = json.loads((tmp_path / "cut" / "train.json").read_text())
    for x in manifest["shards"]:
        x["url"] = str(tmp_path / "cut" / Path(x["url"]).name)
    (tmp_path / "cut" / "train.json").write_text(json.dumps(manifest))
    victim = Path(manifest["shards"][1]["url"])
    victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 3])
    with pytest.raises(DataError, match=r"reshard: output shard train-00000[01]\.tar got \d+ samples, the selection "
                       r"keeps 100 for it: some shards of .* could not be read in full"):
        reshard(str(tmp_path / "cut" / "train.json"), sel, tmp_path / "short", 100)


def test_a_killed_reshard_resumes_without_rewriting_the_shards_it_finished(tmp_path, digits_shards_dir, checkpoint,
                                                                           monkeypatch):
    import vlp.data.build as build

    spec = str(digits_shards_dir / "train.json")
    sel = _selection(tmp_path, digits_shards_dir, checkpoint, "sel", fraction=0.3)
    whole = build.reshard(spec, sel, tmp_path / "whole", 100)
    names = [Path(x["url"]).name for x in whole["shards"]]
    assert len(names) == 5
    real = build._reshard_one

    def dies_at(name):  # writes the shards before `name`, then is killed while writing it
        def write(path, *args):
            if path.name == name:
                path.with_name(f".{path.name}.tmp").write_bytes(b"half a tar")
                raise KeyboardInterrupt
            return real(path, *args)
        return write

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(build, "_reshard_one", dies_at(names[3]))
        with pytest.raises(KeyboardInterrupt):
            build.reshard(spec, sel, out, 100)
    assert not (out / "train.json").exists() and (out / names[2]).is_file() and not (out / names[3]).exists()
    (out / names[1]).write_bytes((out / names[1]).read_bytes()[:2048])  # damaged after the kill: written again
    before = {n: (out / n).stat().st_ino for n in names[:3]}
    # started again, here under torchrun with 2 ranks: only shards 1, 3 and 4 are written
    proc = torchrun(2, "-m", "vlp.data.build", "reshard", spec, str(sel), str(out), "--shard-size", "100")
    assert "2 of 5 output shards were finished by an earlier run of this selection and kept" in proc.stderr
    assert [(out / n).stat().st_ino == before[n] for n in names[:3]] == [True, False, True]
    assert all((out / n).read_bytes() == (tmp_path / "whole" / n).read_bytes() for n in names)
    shards = lambda d: [(Path(x["url"]).name, x["num_samples"]) for x in json.loads((d / "train.json").read_text())["shards"]]  # noqa: E731
    assert shards(out) == shards(tmp_path / "whole")
    assert not list(out.glob(".*"))  # markers, partial shards and the rank exchange are gone
    # finished, a rerun writes nothing; another selection into the same directory rewrites every shard
    again = {n: (out / n).stat().st_ino for n in names}
    build.reshard(spec, sel, out, 100)
    assert {n: (out / n).stat().st_ino for n in names} == again
    other = _selection(tmp_path, digits_shards_dir, checkpoint, "other", fraction=0.2)
    with monkeypatch.context() as m:
        m.setattr(build, "_reshard_one", dies_at(names[1]))
        with pytest.raises(KeyboardInterrupt):
            build.reshard(spec, other, out, 100)
    assert not (out / "train.json").exists()  # the first selection's manifest no longer describes the files
    first = (out / names[0]).stat().st_ino  # written for the other selection before the kill: kept
    build.reshard(spec, other, out, 100)
    assert (out / names[0]).stat().st_ino == first
    build.reshard(spec, other, tmp_path / "other_whole", 100)
    kept = sorted(p.name for p in (tmp_path / "other_whole").glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == kept and len(kept) == 3
    assert all((out / n).read_bytes() == (tmp_path / "other_whole" / n).read_bytes() for n in kept)
    # the markers of a killed run name its selection: another selection into that directory keeps none of it
    with monkeypatch.context() as m:
        m.setattr(build, "_reshard_one", dies_at(names[3]))
        with pytest.raises(KeyboardInterrupt):
            build.reshard(spec, sel, tmp_path / "mixed", 100)
    left = {n: (tmp_path / "mixed" / n).stat().st_ino for n in names[:3]}
    build.reshard(spec, other, tmp_path / "mixed", 100)
    assert all((tmp_path / "mixed" / n).stat().st_ino != left[n] for n in kept)
    assert all((tmp_path / "mixed" / n).read_bytes() == (tmp_path / "other_whole" / n).read_bytes() for n in kept)


def test_a_weighted_selection_draws_each_sample_into_an_epoch_with_its_weight(tmp_path):
    import pickle

    sizes = [700, 300]  # weights: 0, 1, 0.25 and 0.6, and the last 100 of weight 0.6 not kept
    w = np.repeat([0.0, 1.0, 0.25, 0.6], [100, 100, 400, 400])
    keep = np.arange(1000) < 900
    meta = write_selection(tmp_path / "w", keep, ["a.tar", "b.tar"], sizes, {}, weights=w)
    sel = Selection(tmp_path / "w")
    assert sel.weighted and sel.kept == 800  # weight 0 and the unkept are not kept
    assert meta["expected_per_epoch"] == pytest.approx(100 + 400 * 64 / 255 + 300 * 153 / 255, abs=1e-3)
    epochs = 300
    seen = np.array([np.concatenate([sel.kept_in(0, e), sel.kept_in(1, e)]) for e in range(epochs)])
    assert not seen[:, :100].any() and seen[:, 100:200].all() and not seen[:, 900:].any()
    for lo, hi, p in ((200, 600, 64 / 255), (600, 900, 153 / 255)):
        freq = seen[:, lo:hi].mean(axis=0)  # per sample: binomial over 300 epochs, sd <= 0.029
        assert abs(freq.mean() - p) < 0.01 and np.abs(freq - p).max() < 0.15
    assert abs(seen.sum(axis=1).mean() - sel.per_epoch) < 5
    assert (seen[0] != seen[1]).any()  # drawn anew each epoch, the same in every process
    again = pickle.loads(pickle.dumps(sel))
    assert all((again.kept_in(s, 7) == sel.kept_in(s, 7)).all() for s in (0, 1))
    # two selections with other weights draw independently (the fingerprint seeds the draw)
    other = Selection(tmp_path / "w2") if write_selection(tmp_path / "w2", keep, ["a.tar", "b.tar"], sizes, {},
                                                          weights=np.where(w > 0, 0.5, 0)) else None
    both = np.mean([(np.concatenate([other.kept_in(0, e), other.kept_in(1, e)])[200:600] & seen[e, 200:600]).mean()
                    for e in range(epochs)])
    assert abs(both - 0.5 * 64 / 255) < 0.01
    with pytest.raises(DataError, match="in \\[0, 1\\]"):
        write_selection(tmp_path / "bad", keep, ["a.tar", "b.tar"], sizes, {}, weights=np.full(1000, 1.5))
    write_selection(tmp_path / "w", keep, ["a.tar", "b.tar"], sizes, {})  # rewritten in place, unweighted
    assert not Selection(tmp_path / "w").weighted and not (tmp_path / "w" / "weights.npy").exists()
    (tmp_path / "w2" / "weights.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="weights.npy"):
        Selection(tmp_path / "w2").kept_in(0, 0)
    np.save(tmp_path / "w" / "mask.npy", np.zeros(3, np.uint8))  # 24 bits for 1,000 samples
    with pytest.raises(DataError, match="mask.npy' holds \\(3,\\) uint8 where 125 uint8"):
        Selection(tmp_path / "w").kept_in(0, 0)
    meta = json.loads((tmp_path / "w" / "selection.json").read_text())
    (tmp_path / "w" / "selection.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "fingerprint"}))
    with pytest.raises(DataError, match="selection.json' lacks fingerprint"):
        Selection(tmp_path / "w")


def test_gmm_posterior_recovers_a_known_mixture():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.10, 0.03, 4000), rng.normal(0.30, 0.04, 6000)]).astype(np.float32)
    post, info = gmm_posterior(x)

    def pdf(v, m, sd):
        return np.exp(-0.5 * ((v - m) / sd) ** 2) / sd

    true = 0.6 * pdf(x, 0.30, 0.04) / (0.6 * pdf(x, 0.30, 0.04) + 0.4 * pdf(x, 0.10, 0.03))
    assert np.abs(post - true).max() < 0.05 and sorted(info["means"]) == pytest.approx([0.10, 0.30], abs=0.005)
    with pytest.raises(ValueError, match="--weights: .*--rule top has none"):  # refused before reading anything
        select("/nonexistent", "/nonexistent-out", "top", weights=True)


@pytest.mark.slow
def test_training_on_a_weighted_selection_follows_each_epochs_draw(
        tmp_path, digits_shards_dir, checkpoint):
    scores = tmp_path / "scores"
    score_shards(str(digits_shards_dir / "train.json"), str(checkpoint), scores, batch_size=128)
    select(scores, tmp_path / "sel", "gmm", min_posterior=0.05, weights=True)
    sel = Selection(tmp_path / "sel")
    # the weights are the fitted mixture's posteriors, checked against its closed form
    table, _ = read_scores(scores, ["uid", "score"])
    fit = json.loads((tmp_path / "sel" / "report.json").read_text())["found"]["gmm"]
    m, sd, pi = (np.array(fit[k]) for k in ("means", "stds", "weights"))
    x = table["score"].to_numpy().astype(np.float64)[:, None]
    dens = pi * np.exp(-0.5 * ((x - m) / sd) ** 2) / sd
    post = dens[:, fit["clean_component"]] / dens.sum(axis=1)
    levels = np.asarray(sel.levels)[table["uid"].to_numpy()]
    kept = post >= 0.05
    assert np.abs(levels[kept] - post[kept] * 255).max() <= 1 and not levels[~kept].any()
    with pytest.raises(DataError, match="weighted selection"):
        from vlp.data.build import reshard
        reshard(str(digits_shards_dir / "train.json"), tmp_path / "sel", tmp_path / "out")
    # the test draws on a light weight, so that 20 steps of 50 cross epochs
    uids = {k: i for i, k in enumerate(_members(digits_shards_dir))}
    sizes = sel.meta["sizes"]
    write_selection(tmp_path / "light", np.ones(1500, bool), sel.meta["shards"], sizes, {},
                    weights=np.clip(np.asarray(sel.levels) / 255, 0, 0.3))
    light = Selection(tmp_path / "light")
    drawn = {e: set(np.flatnonzero(np.concatenate([light.kept_in(s, e) for s in range(len(sizes))])).tolist())
             for e in range(6)}
    extra = {"data.select": tmp_path / "light", "train.steps": 20}
    train_run(2, tmp_path / "full", digits_shards_dir, **extra)
    by_epoch: dict[int, list[int]] = {}
    for f in (tmp_path / "full" / "consumed").glob("rank*.jsonl"):
        for rec in map(json.loads, f.read_text().splitlines()):
            by_epoch.setdefault(rec["epoch"], []).extend(uids[k] for k in rec["keys"])
    assert len(by_epoch) >= 2  # every batch of epoch e is inside e's draw, no sample twice in an epoch
    assert all(set(u) <= drawn[e] and len(u) == len(set(u)) for e, u in by_epoch.items())
    if os.environ.get("VLP_TEST_EXTENDED") == "1":  # exact resume, as the unweighted test checks by default
        train_run(2, tmp_path / "cut", digits_shards_dir, **extra, **{"train.stop_after_steps": 13})
        train_run(2, tmp_path / "cut", digits_shards_dir, resume=True, **extra)
        assert all_keys(tmp_path / "cut") == all_keys(tmp_path / "full")
        assert_same_weights(weights(tmp_path / "cut"), weights(tmp_path / "full"))


@pytest.fixture(scope="module")
def coca_checkpoint(tmp_path_factory) -> Path:
    return _random_checkpoint(tmp_path_factory, "coca-nano")


def test_multi_text_draws_between_alt_text_and_synthetic_members():
    from vlp.data.mixture import MultiText

    sample = {"__key__": "k", "txt": b"alt text", "syn.txt": b"synthetic caption"}
    drawn = {MultiText(["txt+syn.txt"], 0, 0, epoch)(sample, {}) for epoch in range(20)}
    assert drawn == {"alt text", "synthetic caption"}
    events: dict = {}
    assert MultiText(["txt+syn.txt"], 0, 0, 0)({"__key__": "k", "syn.txt": b"only"}, events) == "only"
    assert MultiText(["txt+syn.txt"], 0, 0, 0)({"__key__": "k"}, events) is None and events == {"skipped:no_caption": 1}


@pytest.mark.slow
def test_recaptioned_shards_train_as_tips_streams_and_as_caption_mixing(tmp_path, digits_shards_dir, coca_checkpoint):
    out = tmp_path / "recap"
    run([sys.executable, "-m", "vlp.curate", "caption", str(digits_shards_dir / "train.json"), str(out),
         "--checkpoint", str(coca_checkpoint), "--max-len", "8", "--batch-size", "200"])
    clean, recap = _members(digits_shards_dir), _members(out)
    assert list(recap) == list(clean)
    assert all({k: v for k, v in recap[key].items() if k != "syn.txt"} == clean[key] for key in clean)
    assert all(recap[key]["syn.txt"].strip() for key in clean)  # every sample got a synthetic caption
    again = run([sys.executable, "-m", "vlp.curate", "caption", str(digits_shards_dir / "train.json"), str(out),
                 "--checkpoint", str(coca_checkpoint), "--max-len", "8"]).stdout
    assert "0 shards recaptioned (8 already done)" in again
    base = [sys.executable, "train.py", "--config", "tests/configs/digits_nano.yaml", "evals={}", "train.steps=3",
            "data.workers=1"]
    run([*base, f"run_dir={tmp_path / 'tips'}", "model.name=tips-nano", "loss.name=tips",
         f"data.train_shards={out}/train.json", "data.text_streams=[txt,syn.txt]"])
    run([*base, f"run_dir={tmp_path / 'mix'}", f"data.sources=[{{name: recap, shards: '{out}/train.json', "
         "kind: multi_text, text_key: 'txt+syn.txt'}]"])
    for name in ("tips", "mix"):
        assert (tmp_path / name / "model.safetensors").is_file()
