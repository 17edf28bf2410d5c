"""`python -m vlp.caption`: captions from a CoCa checkpoint, and how often they name the right class.

    python -m vlp.caption --checkpoint runs/coca_demo --images shoe.png bag.jpg --method beam
    python -m vlp.caption --checkpoint runs/coca_demo --eval fashion-mnist --max-samples 2000

`--eval` captions the held-out split of a labelled dataset (fashion-mnist, digits, or a
CLIP_benchmark webdataset directory) and counts a caption as correct when the class phrase it
names is one of the true class's synonyms (vlp/data/captions.py; class names alone for a
directory). When phrases of several classes occur, the longest wins ("tee shirt" is a T-shirt,
not a shirt); a tie between classes, or no class phrase, counts as wrong.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

import torch

from vlp.generate import METHODS, generate

_WORD = re.compile(r"[a-z0-9]+(?:[-/][a-z0-9]+)*")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def caption_class(caption: str, synonyms: Sequence[Sequence[str]]) -> int | None:
    """Class whose longest synonym phrase occurs (as whole words) in `caption`; None if none or a tie."""
    words = _words(caption)
    best_len, best = 0, set()
    for cls, names in enumerate(synonyms):
        for name in names:
            phrase = _words(name)
            n = len(phrase)
            if n and any(words[i:i + n] == phrase for i in range(len(words) - n + 1)):
                if n > best_len:
                    best_len, best = n, {cls}
                elif n == best_len:
                    best.add(cls)
    return next(iter(best)) if len(best) == 1 else None


def dataset_synonyms(name: str, classnames: Sequence[str]) -> list[list[str]]:
    from vlp.data.captions import SYNONYMS

    if name in SYNONYMS:
        return [[*syn, cls] for syn, cls in zip(SYNONYMS[name], classnames)]
    return [[c] for c in classnames]


@torch.no_grad()
def caption_accuracy(model: torch.nn.Module, tokenizer, dataset: str = "fashion-mnist", split: str = "test",
                     max_samples: int = 0, batch_size: int = 256, device: str = "cpu",
                     **gen_kwargs) -> dict:
    """Fraction of images whose generated caption names their class (see the module docstring)."""
    from vlp.data.datasets import load_eval_dataset
    from vlp.data.transforms import eval_transform

    data = load_eval_dataset(dataset, split=split, max_samples=max_samples)
    synonyms = dataset_synonyms(dataset, data.classnames)
    transform = eval_transform(model.preprocess)
    model = model.to(device)
    correct, named, examples = 0, 0, []
    for start in range(0, len(data), batch_size):
        idx = range(start, min(len(data), start + batch_size))
        images = torch.stack([transform(data.image(i)) for i in idx]).to(device)
        texts = generate(model, images, tokenizer, **gen_kwargs).texts
        for i, text in zip(idx, texts):
            pred = caption_class(text, synonyms)
            named += pred is not None
            correct += pred == int(data.labels[i])
            if len(examples) < 10:
                examples.append({"caption": text, "label": data.classnames[int(data.labels[i])]})
    n = len(data)
    return {"caption_accuracy": correct / max(1, n), "names_a_class": named / max(1, n), "num_samples": n,
            "examples": examples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp.caption", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run dir, model.safetensors or checkpoint dir")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", help="image files to caption")
    what.add_argument("--eval", metavar="DATASET", help="caption accuracy on fashion-mnist, digits or a wds dir")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-samples", type=int, default=0, help="0: the whole split")
    parser.add_argument("--method", default="greedy", choices=METHODS)
    parser.add_argument("--max-len", type=int, default=None, help="tokens incl. sot/eot; default: context length")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="for the sampling methods")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from PIL import Image

    from vlp.data.transforms import eval_transform
    from vlp.loading import LOAD_ERRORS, load_model

    gen = dict(method=args.method, max_len=args.max_len, num_beams=args.num_beams, top_k=args.top_k,
               top_p=args.top_p, temperature=args.temperature,
               generator=torch.Generator(device=args.device).manual_seed(args.seed))
    try:
        model, pre, tokenizer = load_model(args.checkpoint, device=args.device)
        if args.eval:
            res = caption_accuracy(model, tokenizer, args.eval, args.split, args.max_samples, args.batch_size,
                                   args.device, **gen)
            res = {"dataset": args.eval, "split": args.split, "method": args.method, **res}
            print(f"captions naming the right class on {args.eval} ({args.split}, {res['num_samples']} images, "
                  f"{args.method}): {100 * res['caption_accuracy']:.2f}%")
        else:
            transform = eval_transform(pre)
            images = []
            for path in args.images:
                try:
                    images.append(transform(Image.open(path)))
                except (OSError, ValueError) as e:
                    raise ValueError(f"cannot read image '{path}': {e}") from None
            texts = generate(model, torch.stack(images), tokenizer, **gen).texts
            res = {"captions": dict(zip(args.images, texts))}
            for path, text in zip(args.images, texts):
                print(f"{path}\t{text}")
    except LOAD_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
