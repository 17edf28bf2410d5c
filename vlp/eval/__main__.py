"""`python -m vlp.eval zeroshot --checkpoint PATH --dataset NAME`: evaluate any checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp.eval", description=__doc__)
    sub = parser.add_subparsers(dest="task", required=True)
    zs = sub.add_parser("zeroshot", help="zero-shot classification: top-1, top-5, mean per-class recall")
    zs.add_argument("--checkpoint", required=True,
                    help="run directory, model.safetensors file, or DeepSpeed checkpoint directory")
    zs.add_argument("--dataset", default="fashion-mnist",
                    help="fashion-mnist, digits, or a CLIP_benchmark-style webdataset directory")
    zs.add_argument("--ema", action="store_true",
                    help="evaluate the run's EMA weights (model_ema.safetensors or the checkpoint's EMA)")
    zs.add_argument("--split", default="test")
    zs.add_argument("--batch-size", type=int, default=256)
    zs.add_argument("--max-samples", type=int, default=0, help="0: the whole split")
    zs.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    zs.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from vlp.data.sources import load_eval_dataset
    from vlp.eval.zeroshot import evaluate_zeroshot
    from vlp.loading import LoadError, load_model

    try:
        model, pre, tokenizer = load_model(args.checkpoint, device=args.device, ema=args.ema)
        data = load_eval_dataset(args.dataset, split=args.split, max_samples=args.max_samples)
    except (LoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = evaluate_zeroshot(model, tokenizer, data, pre, args.batch_size, args.device)
    res = {"task": "zeroshot", "dataset": args.dataset, "split": args.split, "checkpoint": args.checkpoint, "ema": args.ema, **res}
    print(f"zero-shot {args.dataset} ({args.split}, {res['num_samples']} images): "
          f"top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  "
          f"mean per-class recall {100 * res['mean_per_class_recall']:.2f}%")
    print(json.dumps(res))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
