"""Command line of `train.py` / `vlp-train`: --config, --resume and dotted overrides."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Pretrain a vision-language model. Launch with torchrun for several processes.",
        epilog="example: torchrun --nproc_per_node=8 train.py --config configs/clip_vit_b16.yaml "
               "data.train_shards='/data/laion/{000000..041455}.tar' optim.lr=5e-4",
    )
    parser.add_argument("--config", help="YAML preset (see configs/); optional with --resume CHECKPOINT_DIR, "
                        "whose saved config is used then")
    parser.add_argument("--resume", help="'latest' (the run dir's newest checkpoint, if any) or a checkpoint directory")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3")
    # the `deepspeed` launcher appends --local_rank=N (it also sets LOCAL_RANK, which is what we read)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from vlp.config import ConfigError, load_config
    from vlp.data.pipeline import DataError
    from vlp.train.checkpoint import CheckpointError
    from vlp.train.guard import Preempted
    from vlp.train.nonfinite import NonFiniteStop
    from vlp.train.trainer import TrainError

    try:
        base = None
        if args.config is None and args.resume not in (None, "latest"):
            from vlp.train.checkpoint import read_meta

            base = read_meta(args.resume)["run_config"]
        cfg = load_config(args.config, args.overrides, base=base)
        from vlp.train.trainer import Trainer

        trainer = Trainer(cfg, resume=args.resume)
    except (ConfigError, DataError, CheckpointError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.fit()
    except CheckpointError as e:  # a save that failed (full disk, file size limit): nothing was published
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteStop as e:  # train.nonfinite: nothing non-finite reached the weights or a checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Preempted as e:  # checkpointed on SIGTERM/SIGUSR1: a restart resumes it
        print(str(e), file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
