"""How learnable are the clipart categories for a given image tower and budget? (docs/dense.md)

Trains the image tower of a vlp model *with labels*: image embedding -> linear head -> cross-entropy
on the category covering the most pixels of each train scene (read from its mask; it differs from
the shards' `cls`, the category of the largest single object that `python -m vlp.eval zeroshot` scores,
only where two objects of one category together outsize it),
then reports top-1 on the train scenes (seen SVG files) and on the test scenes (held-out files). This
is an upper reference for what contrastive pretraining on captions can reach at the same budget:
zero-shot classification, and with it zero-shot segmentation of objects, cannot be expected to
recognise categories that direct supervision of the same tower does not.

    python scripts/clipart_ceiling.py --data data/clipart --model clip-tiny --image-size 48 \
        --patch-size 8 --steps 900 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F


def largest_class(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """[N] index (0-based, background excluded) of the class with the most pixels in each mask."""
    flat = masks.reshape(len(masks), -1).astype(np.int64)
    counts = np.stack([np.bincount(m, minlength=num_classes + 1)[1:num_classes + 1] for m in flat])
    return counts.argmax(1)


def main(argv: list[str] | None = None) -> int:
    from vlp.data.segmentation import load_segmentation_dataset
    from vlp.eval.segmentation import preprocess_images
    from vlp.models.registry import create_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/clipart")
    ap.add_argument("--model", default="clip-tiny")
    ap.add_argument("--timm-model", default="", help="another timm image model for the preset's tower")
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    train = load_segmentation_dataset(args.data, "train")
    test = load_segmentation_dataset(args.data, "test")
    k = len(train.classnames)
    vision = {"timm_kwargs": {"img_size": args.image_size, "patch_size": args.patch_size}}
    if args.timm_model:
        vision["timm_model"] = args.timm_model
    model = create_model(args.model, vision=vision, preprocess={"image_size": args.image_size})
    pre = model.config.preprocess
    x_train, x_test = preprocess_images(train.images, pre), preprocess_images(test.images, pre)
    y_train, y_test = largest_class(train.masks, k), largest_class(test.masks, k)
    head = torch.nn.Linear(model.config.embed_dim, k)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)

    @torch.no_grad()
    def top1(x: torch.Tensor, y: np.ndarray, n: int = 1000) -> float:
        model.eval()
        pred = torch.cat([head(model.encode_image(x[i:i + 250])).argmax(1) for i in range(0, min(n, len(x)), 250)])
        model.train()
        return float((pred.numpy() == y[:len(pred)]).mean())

    gen = torch.Generator().manual_seed(args.seed)
    history, t0 = [], time.time()
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=gen)
        x = x_train[idx].clone()
        flip = torch.rand(args.batch_size, generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        loss = F.cross_entropy(head(model.encode_image(x)), torch.from_numpy(y_train[idx.numpy()]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "loss": round(loss.item(), 4), "train_top1": top1(x_train, y_train),
                   "test_top1": top1(x_test, y_test, len(x_test)), "seconds": round(time.time() - t0, 1)}
            history.append(row)
            print(json.dumps(row), flush=True)
    chance = float(np.bincount(y_test, minlength=k).max() / len(y_test))
    result = {"args": vars(args), "history": history, "test_majority_class": chance}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
