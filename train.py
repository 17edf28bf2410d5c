"""Thin entry point: parse config -> build -> train -> close.

    python train.py --config configs/demo.yaml                       # one process
    torchrun --nproc_per_node=8 train.py --config configs/clip_vit_b16.yaml optim.lr=1e-3
    python train.py --config configs/demo.yaml --resume latest       # continue a run
"""

import sys

from vlp.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
