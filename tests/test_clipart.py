"""Clipart scenes: SVG metadata, a file split disjoint between train and test, exact masks with
occlusion checked on hand-made sprites, determinism, and the shards round trip."""

from pathlib import Path

import numpy as np
import pytest

from vlp.data import clipart
from vlp.data.clipart import Sprite, make_scene, svg_metadata

needs_openclipart = pytest.mark.skipif(
    not clipart.OPENCLIPART_DIR.is_dir(), reason="openclipart-svg is not installed (scripts/install.sh)"
)
SMALL = 8  # files per category in these tests: fast rasterization


@pytest.fixture(scope="module")
def sprite_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sprite cache for the module, so the SVGs are rasterized once."""
    return tmp_path_factory.mktemp("sprite_cache")


def test_svg_metadata_prefers_the_work_title(tmp_path: Path):
    svg = tmp_path / "some_file_name_01.svg"
    svg.write_text(
        '<svg><metadata><rdf:RDF><cc:Work rdf:about="">'
        "<dc:title>Red  Apple &amp;amp; Leaf</dc:title>"
        "<dc:subject><rdf:Bag><rdf:li>fruit</rdf:li><rdf:li></rdf:li><rdf:li>apple</rdf:li></rdf:Bag></dc:subject>"
        "<dc:creator><cc:Agent><dc:title>Some Author</dc:title></cc:Agent></dc:creator>"
        "</cc:Work></rdf:RDF></metadata></svg>"
    )
    assert svg_metadata(svg) == ("Red Apple & Leaf", ["fruit", "apple"])
    # author title only -> <title> element; no titles at all -> file name
    svg.write_text('<svg><cc:Work><cc:Agent><dc:title>Author</dc:title></cc:Agent></cc:Work>'
                   "<title>bicycle</title></svg>")
    assert svg_metadata(svg)[0] == "bicycle"
    svg.write_text("<svg><cc:Work><dc:title>Open Clip Art Library</dc:title></cc:Work></svg>")
    assert svg_metadata(svg)[0] == "some file name"


def _square_sprite(category: int, color: tuple[int, int, int], size: int = 20) -> Sprite:
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[2:-2, 2:-2, :3] = color
    rgba[2:-2, 2:-2, 3] = 255
    return Sprite(rgba, category, f"title {category}", [], "red", f"f{category}.svg")


def test_scene_mask_is_exact_with_occlusion():
    # black background and full-intensity colours: a channel >= 128 exactly where that sprite's alpha is
    flat = [(np.zeros((40, 40), np.uint8), "plain", True)]
    sprites = [_square_sprite(0, (255, 0, 0)), _square_sprite(3, (0, 0, 255))]
    overlaps = 0
    for i in range(60):
        sc = make_scene(np.random.RandomState(i), sprites, flat, size=48)
        assert sc.image.shape == (48, 48, 3) and sc.mask.shape == (48, 48)
        assert set(np.unique(sc.mask)) <= {0, 1, 4}
        # a pixel is labelled exactly where a sprite's alpha is >= 0.5: red -> class 1, blue -> class 4
        # (checked where boxes are apart: two same-coloured soft edges can add up past 128)
        red, blue = sc.image[..., 0] >= 128, sc.image[..., 2] >= 128
        if not any(_boxes_meet(a, b) for j, a in enumerate(sc.objects) for b in sc.objects[:j]):
            assert np.array_equal(red, sc.mask == 1) and np.array_equal(blue, sc.mask == 4)
        assert sum(o["visible"] for o in sc.objects) == int((sc.mask > 0).sum())
        # every interior pixel of a square that no later object's box covers carries its class
        for j, obj in enumerate(sc.objects):
            region = _interior(obj)
            for later in sc.objects[j + 1:]:
                x, y, w, h = later["bbox"]
                overlaps += int(region[y:y + h, x:x + w].any())
                region[y:y + h, x:x + w] = False
            assert (sc.mask[region] == clipart.CLASSNAMES.index(obj["category"]) + 1).all()
        main = max(sc.objects, key=lambda o: o["visible"])
        assert sc.caption == main["title"] and sc.label == clipart.CLASSNAMES.index(main["category"])
        assert sc.synthetic_caption.endswith(" on plain") and main["category"] in sc.synthetic_caption
    assert overlaps > 0


def _boxes_meet(a: dict, b: dict) -> bool:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a["bbox"], b["bbox"]
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def _interior(obj: dict, size: int = 48) -> np.ndarray:
    """Pixels well inside a pasted square (its 2-px transparent border and resampling edge excluded)."""
    x, y, w, h = obj["bbox"]
    m = np.zeros((size, size), bool)
    bx, by = max(2, int(np.ceil(w * 3 / 20))), max(2, int(np.ceil(h * 3 / 20)))
    m[y + by: y + h - by, x + bx: x + w - bx] = True
    return m


def test_position_phrases():
    assert clipart._position_phrase(2, 2, 60) == "at the top left"
    assert clipart._position_phrase(30, 30, 60) == "in the center"
    assert clipart._position_phrase(30, 55, 60) == "on the right"
    assert clipart._position_phrase(58, 30, 60) == "at the bottom"


@needs_openclipart
def test_split_is_disjoint_in_files_and_covers_every_category():
    splits = clipart.split_files(max_per_class=SMALL)
    train = {f for f, _ in splits["train"]}
    test = {f for f, _ in splits["test"]}
    assert train and test and not train & test
    assert {c for _, c in splits["train"]} == {c for _, c in splits["test"]} == set(range(len(clipart.CATEGORIES)))
    assert clipart.split_files(max_per_class=SMALL) == splits  # fixed, whatever the scene seed


@needs_openclipart
def test_scenes_are_deterministic_and_splits_use_their_own_files(sprite_cache: Path):
    bank = clipart.load_sprites(SMALL, cache_dir=sprite_cache)
    assert bank.sprites["train"] and bank.sprites["test"]
    a = list(clipart.generate_scenes("test", 6, 48, seed=1, max_per_class=SMALL, bank=bank))
    b = list(clipart.generate_scenes("test", 6, 48, seed=1, max_per_class=SMALL,
                                     bank=clipart.load_sprites(SMALL, cache_dir=sprite_cache)))  # from the cache
    c = list(clipart.generate_scenes("test", 6, 48, seed=2, max_per_class=SMALL, bank=bank))
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b))
    assert [x.synthetic_caption for x in a] == [y.synthetic_caption for y in b]
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))
    test_files = {s.file for s in bank.sprites["test"]}
    assert all(o["file"] in test_files for sc in a for o in sc.objects)
    with pytest.raises(ValueError, match="split"):
        next(clipart.generate_scenes("val", 1, 48, bank=bank))


@needs_openclipart
def test_shards_round_trip(tmp_path: Path, sprite_cache: Path, monkeypatch):
    import webdataset as wds

    from vlp.data.build import build_clipart_shards
    from vlp.data.datasets import load_eval_dataset
    from vlp.data.segmentation import clipart_segmentation, load_segmentation_dataset

    monkeypatch.setattr(clipart, "CACHE_DIR", sprite_cache)
    out = tmp_path / "clipart"
    manifest = build_clipart_shards(out, "test", num_scenes=12, size=48, shard_size=5, max_per_class=SMALL)
    assert manifest["num_samples"] == 12 and len(manifest["shards"]) == 3
    samples = list(wds.tarfile_samples([{"url": s["url"]} for s in manifest["shards"]]))
    assert len(samples) == 12
    assert {"jpg", "txt", "syn.txt", "cls", "seg.png", "json"} <= set(samples[0])
    seg = load_segmentation_dataset(str(out), "test")
    mem = clipart_segmentation("test", 12, 48, max_per_class=SMALL)
    assert np.array_equal(seg.masks, mem.masks)  # masks are stored losslessly
    assert np.abs(seg.images.astype(int) - mem.images).mean() < 6  # jpg
    assert [s["syn.txt"].decode() for s in samples] == [sc.synthetic_caption for sc in
                                                      clipart.generate_scenes("test", 12, 48, max_per_class=SMALL)]
    assert seg.classnames == clipart.CLASSNAMES and seg.background_names == clipart.BACKGROUND_NAMES
    cls = load_eval_dataset(str(out), "test")  # also a CLIP_benchmark-style classification set
    assert len(cls) == 12 and cls.classnames == clipart.CLASSNAMES
    # a second build with the same arguments finds the manifest and does nothing
    assert build_clipart_shards(out, "test", num_scenes=12, size=48, shard_size=5, max_per_class=SMALL) == manifest
