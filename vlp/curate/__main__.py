"""python -m vlp.curate {noise,score,select,caption} ... (see vlp/curate/__init__.py)."""

from __future__ import annotations

import sys


def _noise(argv: list[str]) -> int:
    import argparse

    from vlp.curate.noise import make_noisy
    from vlp.data.manifest import DataError

    ap = argparse.ArgumentParser(prog="python -m vlp.curate noise",
                                 description="permute the captions of a fraction of the pairs among themselves")
    ap.add_argument("spec")
    ap.add_argument("out_dir")
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-key", default="txt")
    args = ap.parse_args(argv)
    try:
        m = make_noisy(args.spec, args.out_dir, args.rate, args.seed, args.text_key)
    except (DataError, FileNotFoundError) as e:
        print(f"vlp.curate noise: error: {e}", file=sys.stderr)
        return 2
    print(f"{m['num_samples']} samples in {len(m['shards'])} shards: {args.out_dir}/train.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("noise", "score", "select", "caption"):
        print("usage: python -m vlp.curate {noise,score,select,caption} ...", file=sys.stderr)
        return 2
    if argv[0] == "noise":
        return _noise(argv[1:])
    if argv[0] == "score":
        from vlp.curate.score import main as score_main

        return score_main(argv[1:])
    if argv[0] == "caption":
        from vlp.curate.caption import main as caption_main

        return caption_main(argv[1:])
    from vlp.curate.select import main as select_main

    return select_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
