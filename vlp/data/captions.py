"""Class names, synonyms and caption templates for the built-in datasets.

Training captions are made from TRAIN_TEMPLATES x synonyms; zero-shot evaluation uses
EVAL_TEMPLATES, which are kept disjoint from the training ones so that eval accuracy measures
transfer to unseen phrasings rather than recall of memorised caption strings.
Templates use a single positional `{}` placeholder for the class word.
"""

from __future__ import annotations

import random

FASHION_CLASSNAMES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

FASHION_SYNONYMS: list[list[str]] = [
    ["t-shirt", "tee", "top", "t-shirt/top", "tee shirt"],
    ["trouser", "trousers", "pants", "slacks"],
    ["pullover", "jumper", "sweater", "knit sweater"],
    ["dress", "gown", "frock"],
    ["coat", "jacket", "overcoat"],
    ["sandal", "sandals", "open shoe", "flip-flop"],
    ["shirt", "button-up shirt", "blouse", "collared shirt"],
    ["sneaker", "sneakers", "trainers", "running shoe"],
    ["bag", "handbag", "purse", "tote bag"],
    ["ankle boot", "boots", "boot", "short boot"],
]

FASHION_TRAIN_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a {} on a plain background",
    "product shot of {}",
    "a picture of a {}.",
    "{}",
    "a small grayscale {}.",
    "catalog image of a {}",
    "a {} for sale.",
    "low resolution photo of a {}.",
    "an item of clothing: {}",
]

FASHION_EVAL_TEMPLATES: list[str] = [
    "a black and white photo of the {}.",
    "an image showing a {}.",
    "a photo of the {}, a type of fashion item.",
    "a blurry photo of a {}.",
    "a close-up of a {}.",
    "this is a {}.",
    "a tiny image of the {}.",
    "a centered photo of a {}.",
]

DIGITS_CLASSNAMES: list[str] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
]

DIGITS_SYNONYMS: list[list[str]] = [
    [name, str(i), f"digit {i}", f"number {name}"] for i, name in enumerate(DIGITS_CLASSNAMES)
]

DIGITS_TRAIN_TEMPLATES: list[str] = [
    "a photo of the digit {}.",
    "a handwritten {}",
    "the number {} written by hand",
    "a scan of a {}.",
    "{}",
    "a pixelated {}.",
    "an 8x8 image of {}",
    "a low resolution handwritten {}.",
    "someone wrote {}",
    "a grayscale digit: {}",
]

DIGITS_EVAL_TEMPLATES: list[str] = [
    "a black and white photo of the number {}.",
    "an image showing a {}.",
    "a drawing of the digit {}.",
    "a blurry image of a {}.",
    "this is the number {}.",
    "a sketch of {}.",
    "a centered image of a {}.",
    "a tiny picture of the numeral {}.",
]

CLASSNAMES: dict[str, list[str]] = {
    "fashion-mnist": FASHION_CLASSNAMES,
    "digits": DIGITS_CLASSNAMES,
}
SYNONYMS: dict[str, list[list[str]]] = {
    "fashion-mnist": FASHION_SYNONYMS,
    "digits": DIGITS_SYNONYMS,
}
TRAIN_TEMPLATES: dict[str, list[str]] = {
    "fashion-mnist": FASHION_TRAIN_TEMPLATES,
    "digits": DIGITS_TRAIN_TEMPLATES,
}
EVAL_TEMPLATES: dict[str, list[str]] = {
    "fashion-mnist": FASHION_EVAL_TEMPLATES,
    "digits": DIGITS_EVAL_TEMPLATES,
}


def _check_source(source: str) -> None:
    if source not in CLASSNAMES:
        raise ValueError(f"unknown caption source '{source}' (known: {', '.join(sorted(CLASSNAMES))})")


def make_caption(class_id: int, rng: random.Random, source: str = "fashion-mnist") -> str:
    """A training caption for `class_id`: random train template filled with a random synonym.

    Randomness comes only from `rng`, so a seeded generator gives reproducible shards.
    """
    _check_source(source)
    synonyms = SYNONYMS[source]
    if not 0 <= class_id < len(synonyms):
        raise ValueError(f"class id {class_id} out of range for '{source}' (0..{len(synonyms) - 1})")
    template = rng.choice(TRAIN_TEMPLATES[source])
    word = rng.choice(synonyms[class_id])
    return template.format(word)
