"""Clipart scenes: openclipart objects pasted on scikit-image textures, with exact masks and two captions.

Source: the Debian package `openclipart-svg` (public-domain SVGs under /usr/share/openclipart/svg,
one folder per category) and the images bundled with scikit-image (`skimage.data`). Nothing is
downloaded. SVGs are rasterized once with `rsvg-convert` (Debian `librsvg2-bin`; `cairosvg` is the
fallback) and cached as RGBA sprites cropped to their alpha box; SVGs that fail to render or render
empty are skipped and counted.

A scene is a random crop of a background (tinted when the texture is grayscale) with 1-3 sprites
pasted at random positions, scales and flips. Later objects occlude earlier ones; the per-pixel class
mask comes from the alpha channel (alpha >= 0.5), so it is exact. Each scene has
  - a noisy caption: the SVG title of its largest visible object (like web alt-text),
  - a synthetic caption of the layout: "a red fruit at the top left and a blue vehicle on the right on brick",
  - a class: the category of that largest visible object,
  - a class mask: 0 = background, i = CATEGORIES[i - 1].name.
Train and test scenes draw from disjoint SVG files (a fixed per-category split, independent of the
scene seed); everything is deterministic from (seed, split).
"""

from __future__ import annotations

import colorsys
import glob
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

OPENCLIPART_DIR = Path(os.environ.get("VLP_OPENCLIPART_DIR", "/usr/share/openclipart/svg"))
CACHE_DIR = Path(os.environ.get("VLP_CACHE_DIR", Path.home() / ".cache" / "vlp"))
SPLIT_SEED = 0  # fixed: the train/test file split never depends on the scene seed
TEST_FRACTION = 0.25
RASTER_SIZE = 128  # sprites are rendered to fit 128x128 and only ever scaled down


@dataclass(frozen=True)
class Category:
    name: str  # class name used in captions and prompts
    dirs: tuple[str, ...]  # folders under OPENCLIPART_DIR, searched recursively


CATEGORIES: tuple[Category, ...] = (
    Category("fruit", ("food/fruit",)),
    Category("dessert", ("food/desserts",)),
    Category("drink", ("food/beverages",)),
    Category("mammal", ("animals/mammals",)),
    Category("bird", ("animals/birds",)),
    Category("insect", ("animals/bugs",)),
    Category("vehicle", ("transportation/vehicles",)),
    Category("tool", ("tools",)),
    Category("plant", ("plants",)),
    Category("computer", ("computer/hardware",)),
    Category("flag", ("signs_and_symbols/flags",)),
    Category("building", ("buildings",)),
)
CLASSNAMES: list[str] = [c.name for c in CATEGORIES]
# zero-shot prompts; the training captions never use these phrasings
TEMPLATES: list[str] = ["a {}.", "a picture of a {}.", "clipart of a {}.", "there is a {} here."]

# (skimage.data loader name, words used in captions, grayscale texture to tint)
BACKGROUNDS: tuple[tuple[str, str, bool], ...] = (
    ("brick", "brick", True),
    ("grass", "grass", True),
    ("gravel", "gravel", True),
    ("moon", "moon rock", True),
    ("coins", "coins", True),
    ("page", "a printed page", True),
    ("cell", "cells", True),
    ("hubble_deep_field", "a starry sky", False),
    ("immunohistochemistry", "stained tissue", False),
    ("retina", "a retina", False),
)
BACKGROUND_NAMES: list[str] = [b[1] for b in BACKGROUNDS]

_GRID_ROWS = ("top", "middle", "bottom")
_GRID_COLS = ("left", "center", "right")
_TINTS = {  # tint colours for grayscale textures
    "red": (1.0, 0.45, 0.4), "green": (0.5, 0.9, 0.45), "blue": (0.45, 0.6, 1.0),
    "yellow": (1.0, 0.9, 0.4), "gray": (0.85, 0.85, 0.85), "purple": (0.75, 0.5, 1.0),
}


# ---- SVG discovery and metadata --------------------------------------------------------------------

_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_AGENT = re.compile(r"<cc:Agent\b.*?</cc:Agent>", re.S)
_DC_TITLE = re.compile(r"<dc:title>\s*(.*?)\s*</dc:title>", re.S)
_TITLE = re.compile(r"<title[^>]*>\s*(.*?)\s*</title>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>\s*(.*?)\s*</rdf:li>", re.S)
_GENERIC = re.compile(r"^(open ?clip ?art.*|untitled.*|image|drawing|svg|layer ?\d*|)$", re.I)


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(text))
    return " ".join(text.split())


def svg_metadata(path: str | Path) -> tuple[str, list[str]]:
    """(title, keywords) of an openclipart SVG: the cc:Work title (not an author's), else <title>,
    else the file name with underscores as spaces."""
    text = Path(path).read_bytes()[:200_000].decode("utf-8", "replace")
    title = ""
    keywords: list[str] = []
    work = _WORK.search(text)
    if work:
        body = _AGENT.sub("", work.group(0))
        m = _DC_TITLE.search(body)
        title = _clean(m.group(1)) if m else ""
        subj = _SUBJECT.search(body)
        if subj:
            keywords = [k for k in (_clean(x) for x in _LI.findall(subj.group(1))) if k]
    if _GENERIC.match(title):
        m = _TITLE.search(text)
        title = _clean(m.group(1)) if m else ""
    if _GENERIC.match(title):
        stem = re.sub(r"_\d+$", "", Path(path).stem)
        title = _clean(stem.replace("_", " ").replace("-", " "))
    return title, keywords


def category_files(category: Category, root: Path = OPENCLIPART_DIR) -> list[str]:
    """Sorted SVG paths of a category (recursive), relative to `root`."""
    files: set[str] = set()
    for d in category.dirs:
        base = root / d
        files.update(os.path.relpath(p, root) for p in glob.glob(str(base / "**" / "*.svg"), recursive=True))
    return sorted(files)


def split_files(categories: tuple[Category, ...] = CATEGORIES, max_per_class: int = 64,
                root: Path = OPENCLIPART_DIR) -> dict[str, list[tuple[str, int]]]:
    """{"train": [(relpath, class index)], "test": [...]}: a fixed per-category split of the files.

    At most `max_per_class` files per category (a seeded subset), a quarter of them held out for test.
    """
    if not root.is_dir():
        raise FileNotFoundError(
            f"openclipart directory '{root}' not found; install it with "
            "`apt-get install openclipart-svg` or set VLP_OPENCLIPART_DIR"
        )
    out: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for ci, cat in enumerate(categories):
        files = category_files(cat, root)
        if len(files) < 4:
            raise ValueError(f"category '{cat.name}' has only {len(files)} SVGs under {root} ({cat.dirs})")
        rng = np.random.RandomState(SPLIT_SEED + ci)
        files = [files[i] for i in rng.permutation(len(files))[:max_per_class]]
        n_test = max(1, int(round(len(files) * TEST_FRACTION)))
        out["test"] += [(f, ci) for f in sorted(files[:n_test])]
        out["train"] += [(f, ci) for f in sorted(files[n_test:])]
    return out


# ---- rasterization and the sprite cache ------------------------------------------------------------


def _renderer() -> str:
    if shutil.which("rsvg-convert"):
        return "rsvg-convert"
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError):
        raise RuntimeError(
            "no SVG rasterizer: install `rsvg-convert` (apt-get install librsvg2-bin) or `pip install cairosvg`"
        ) from None
    return "cairosvg"


def rasterize(path: str | Path, size: int = RASTER_SIZE, renderer: str | None = None) -> np.ndarray:
    """RGBA uint8 [h, w, 4] of an SVG fitted into size x size (aspect kept). Raises on failure."""
    renderer = renderer or _renderer()
    if renderer == "rsvg-convert":
        proc = subprocess.run(
            ["rsvg-convert", "--keep-aspect-ratio", "-w", str(size), "-h", str(size), "-f", "png", str(path)],
            capture_output=True, timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rsvg-convert failed on '{path}': {proc.stderr.decode(errors='replace')[:200]}")
        png = proc.stdout
    elif renderer == "cairosvg":
        import cairosvg

        png = cairosvg.svg2png(url=str(path), output_width=size)
    else:
        raise ValueError(f"unknown renderer '{renderer}' (known: rsvg-convert, cairosvg)")
    img = Image.open(io.BytesIO(png)).convert("RGBA")
    if max(img.size) > size:
        img.thumbnail((size, size), Image.LANCZOS)
    return np.asarray(img)


def color_name(rgba: np.ndarray) -> str:
    """The most common basic colour word among the opaque pixels of a sprite."""
    px = rgba[rgba[..., 3] >= 128][:, :3].astype(np.float32) / 255.0
    if len(px) == 0:
        return "gray"
    if len(px) > 2000:
        px = px[:: len(px) // 2000]
    votes: dict[str, int] = {}
    for r, g, b in px:
        h, s, v = colorsys.rgb_to_hsv(float(r), float(g), float(b))
        if v < 0.2:
            name = "black"
        elif s < 0.18:
            name = "white" if v > 0.85 else "gray"
        else:
            deg = h * 360
            if deg < 15 or deg >= 345:
                name = "red" if v >= 0.55 else "brown"
            elif deg < 40:
                name = "orange" if v >= 0.65 else "brown"
            elif deg < 70:
                name = "yellow"
            elif deg < 170:
                name = "green"
            elif deg < 260:
                name = "blue"
            elif deg < 300:
                name = "purple"
            else:
                name = "pink"
        votes[name] = votes.get(name, 0) + 1
    # outlines make black/gray/white common in line art: a hue seen on a quarter of the pixels wins
    chromatic = {k: v for k, v in votes.items() if k not in ("black", "gray", "white")}
    if chromatic and max(chromatic.values()) >= 0.25 * len(px):
        votes = chromatic
    return max(sorted(votes), key=lambda k: votes[k])


@dataclass
class Sprite:
    rgba: np.ndarray  # uint8 [h, w, 4], cropped to the alpha box
    category: int
    title: str
    keywords: list[str]
    color: str
    file: str


@dataclass
class SpriteBank:
    sprites: dict[str, list[Sprite]]  # split -> sprites
    failed: list[str] = field(default_factory=list)  # files that failed to render or rendered empty


def _render_one(rel: str, root: Path, renderer: str) -> np.ndarray | None:
    try:
        rgba = rasterize(root / rel, RASTER_SIZE, renderer)
    except Exception:  # any SVG the renderer cannot handle is skipped, never fatal
        return None
    alpha = rgba[..., 3] >= 128
    if alpha.sum() < 64:
        return None
    ys, xs = np.nonzero(alpha)
    crop = rgba[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    if min(crop.shape[:2]) < 6:
        return None
    return np.ascontiguousarray(crop)


def load_sprites(max_per_class: int = 64, root: Path | None = None, cache_dir: Path | None = None,
                 workers: int = 0) -> SpriteBank:
    """Rasterized sprites of both splits, cached in `cache_dir` keyed by the file list and renderer."""
    root = Path(root or OPENCLIPART_DIR)
    cache_dir = Path(cache_dir or CACHE_DIR)
    splits = split_files(CATEGORIES, max_per_class, root)
    renderer = _renderer()
    files = sorted({f for items in splits.values() for f, _ in items})
    stamp = [(f, (root / f).stat().st_size) for f in files]
    key = hashlib.sha1(json.dumps([renderer, RASTER_SIZE, str(root), stamp,
                                   [(c.name, c.dirs) for c in CATEGORIES], 1]).encode()).hexdigest()[:16]
    npz_path = cache_dir / f"clipart-sprites-{key}.npz"
    meta_path = cache_dir / f"clipart-sprites-{key}.json"
    if npz_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        with np.load(npz_path, allow_pickle=False) as z:
            flat, shapes, offsets = z["flat"], z["shapes"], z["offsets"]
        arrays = {f: flat[offsets[i]: offsets[i + 1]].reshape(shapes[i]) for i, f in enumerate(meta["files"])}
    else:
        n_workers = workers or max(1, os.cpu_count() or 1)
        with ThreadPoolExecutor(n_workers) as pool:  # rsvg-convert runs as subprocesses: threads suffice
            rendered = list(pool.map(lambda f: _render_one(f, root, renderer), files))
        arrays = {f: a for f, a in zip(files, rendered) if a is not None}
        ok = [f for f in files if f in arrays]
        titles = {f: svg_metadata(root / f) for f in ok}
        meta = {
            "files": ok,
            "failed": [f for f in files if f not in arrays],
            "titles": {f: titles[f][0] for f in ok},
            "keywords": {f: titles[f][1] for f in ok},
            "colors": {f: color_name(arrays[f]) for f in ok},
        }
        cache_dir.mkdir(parents=True, exist_ok=True)
        shapes = np.array([arrays[f].shape for f in ok], dtype=np.int64).reshape(-1, 3)
        offsets = np.concatenate([[0], np.cumsum([arrays[f].size for f in ok])]).astype(np.int64)
        flat = np.concatenate([arrays[f].ravel() for f in ok]) if ok else np.zeros(0, np.uint8)
        # each file is published by a rename of a name only this process writes: two processes
        # filling the cache at once (parallel tests, two jobs on one node) never read half a file
        tmp = npz_path.with_name(f"{npz_path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, flat=flat, shapes=shapes, offsets=offsets)
        os.replace(tmp, npz_path)
        tmp_meta = meta_path.with_name(f"{meta_path.stem}.{os.getpid()}.tmp.json")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_path)
    bank = SpriteBank({}, list(meta["failed"]))
    for split, items in splits.items():
        bank.sprites[split] = [
            Sprite(arrays[f], ci, meta["titles"][f], meta["keywords"][f], meta["colors"][f], f)
            for f, ci in items if f in arrays
        ]
    return bank


# ---- backgrounds and scene composition -------------------------------------------------------------


def load_backgrounds() -> list[tuple[np.ndarray, str, bool]]:
    """(uint8 image [H, W] or [H, W, 3], caption words, is grayscale texture) for every background."""
    from vlp.extras import require

    skimage_data = require("skimage.data", "the clipart scenes' backgrounds")

    out = []
    for name, words, gray in BACKGROUNDS:
        img = np.asarray(getattr(skimage_data, name)())
        if img.dtype != np.uint8:
            img = (img * 255).astype(np.uint8) if img.max() <= 1 else img.astype(np.uint8)
        if img.ndim == 3:
            img = img[..., :3]
        out.append((img, words, gray))
    return out


@dataclass
class Scene:
    image: np.ndarray  # uint8 [S, S, 3]
    mask: np.ndarray  # uint8 [S, S]: 0 background, i = CLASSNAMES[i - 1]
    caption: str  # noisy: the title of the largest visible object
    synthetic_caption: str  # descriptive layout caption
    label: int  # category of the largest visible object
    objects: list[dict]  # per object: file, title, category, color, bbox, visible pixels


def _position_phrase(cy: float, cx: float, size: int) -> str:
    row = _GRID_ROWS[min(2, int(3 * cy / size))]
    col = _GRID_COLS[min(2, int(3 * cx / size))]
    if row == "middle" and col == "center":
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"at the {row} {col}"


def _background(rng: np.random.RandomState, backgrounds: list, size: int) -> tuple[np.ndarray, str]:
    img, words, gray = backgrounds[rng.randint(len(backgrounds))]
    h, w = img.shape[:2]
    side = int(min(h, w) * rng.uniform(0.25, 1.0))
    top, left = rng.randint(0, h - side + 1), rng.randint(0, w - side + 1)
    crop = Image.fromarray(img[top: top + side, left: left + side]).resize((size, size), Image.BILINEAR)
    arr = np.asarray(crop, dtype=np.float32)
    if gray:
        tint = np.array(list(_TINTS.values())[rng.randint(len(_TINTS))], dtype=np.float32)
        arr = arr[..., None] * tint if arr.ndim == 2 else arr * tint
    elif arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr, words


def make_scene(rng: np.random.RandomState, sprites: list[Sprite], backgrounds: list, size: int = 64,
               max_objects: int = 3) -> Scene:
    """One scene from `rng` (the only randomness), `sprites` of one split and the backgrounds."""
    canvas, bg_words = _background(rng, backgrounds, size)
    mask = np.zeros((size, size), np.uint8)
    inst = np.full((size, size), -1, np.int16)
    placed: list[tuple[Sprite, tuple[int, int, int, int]]] = []
    areas: list[int] = []
    n_obj = rng.randint(1, max_objects + 1)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(n_obj):
        sp = sprites[rng.randint(len(sprites))]
        for _attempt in range(8):  # rejection-sample a placement that overlaps earlier boxes little
            longest = rng.uniform(0.3, 0.6) * size
            h0, w0 = sp.rgba.shape[:2]
            scale = longest / max(h0, w0)
            h, w = max(4, int(round(h0 * scale))), max(4, int(round(w0 * scale)))
            top, left = rng.randint(0, size - h + 1), rng.randint(0, size - w + 1)
            box = (top, left, h, w)
            if all(_overlap(box, b) < 0.3 for b in boxes):
                break
        boxes.append(box)
        img = Image.fromarray(sp.rgba).resize((w, h), Image.BILINEAR)  # Pillow resamples RGBA premultiplied
        if rng.rand() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        rgba = np.asarray(img, dtype=np.float32)
        a = rgba[..., 3:] / 255.0
        region = canvas[top: top + h, left: left + w]
        canvas[top: top + h, left: left + w] = a * rgba[..., :3] + (1 - a) * region
        solid = rgba[..., 3] >= 128
        mask[top: top + h, left: left + w][solid] = sp.category + 1
        inst[top: top + h, left: left + w][solid] = len(placed)
        areas.append(int(solid.sum()))
        placed.append((sp, box))
    objects = []
    for i, (sp, (top, left, h, w)) in enumerate(placed):
        ys, xs = np.nonzero(inst == i)
        objects.append({
            "file": sp.file, "title": sp.title, "category": CLASSNAMES[sp.category], "color": sp.color,
            "bbox": [int(left), int(top), int(w), int(h)], "visible": int(len(ys)),
            "center": [float(ys.mean()), float(xs.mean())] if len(ys) else None,
        })
    main = max(range(len(placed)), key=lambda i: objects[i]["visible"])
    phrases = []
    for i, (sp, _) in enumerate(placed):
        obj = objects[i]
        if obj["center"] is None or obj["visible"] < max(12, 0.25 * areas[i]):
            continue  # (almost) hidden objects are not described
        phrases.append(f"{_article(sp.color)} {sp.color} {CLASSNAMES[sp.category]} "
                       f"{_position_phrase(*obj['center'], size)}")
    if not phrases:  # the largest visible object is always described
        obj = objects[main]
        phrases.append(f"{_article(obj['color'])} {obj['color']} {obj['category']}")
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return Scene(image, mask, objects[main]["title"], f"{text} on {bg_words}",
                 placed[main][0].category, objects)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box of two (top, left, h, w) boxes."""
    t, l_ = max(a[0], b[0]), max(a[1], b[1])
    bo, r = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, bo - t) * max(0, r - l_)
    return inter / max(1, min(a[2] * a[3], b[2] * b[3]))


def _scene_rng(seed: int, split: str, index: int) -> np.random.RandomState:
    digest = hashlib.blake2b(f"clipart:{seed}:{split}:{index}".encode(), digest_size=4).digest()
    return np.random.RandomState(int.from_bytes(digest, "little"))


def generate_scenes(split: str, num_scenes: int, size: int = 64, seed: int = 0, max_per_class: int = 64,
                    bank: SpriteBank | None = None):
    """Yield `num_scenes` Scenes of `split` ('train' | 'test'); scene i depends only on (seed, split, i)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split '{split}' (expected 'train' or 'test')")
    if size < 16:
        raise ValueError(f"scene size must be >= 16 pixels, got {size}")
    bank = bank or load_sprites(max_per_class)
    sprites = bank.sprites[split]
    if not sprites:
        raise ValueError(f"no renderable clipart sprites in split '{split}'")
    backgrounds = load_backgrounds()
    for i in range(num_scenes):
        yield make_scene(_scene_rng(seed, split, i), sprites, backgrounds, size)


def scene_sample(scene: Scene, key: str) -> dict[str, bytes]:
    """A webdataset sample: jpg image, txt (noisy caption), syn.txt (synthetic caption), cls, seg.png, json."""
    img, seg = io.BytesIO(), io.BytesIO()
    Image.fromarray(scene.image).save(img, format="JPEG", quality=92)
    Image.fromarray(scene.mask).save(seg, format="PNG", compress_level=1)
    return {
        "__key__": key,
        "jpg": img.getvalue(),
        "txt": scene.caption.encode("utf-8"),
        "syn.txt": scene.synthetic_caption.encode("utf-8"),
        "cls": str(scene.label).encode("ascii"),
        "seg.png": seg.getvalue(),
        "json": json.dumps({"objects": scene.objects}).encode("utf-8"),
    }
