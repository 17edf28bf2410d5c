"""Train with a checkpoint every 2 steps and die (os._exit) in the middle of the second save,
after DeepSpeed wrote its files but before the checkpoint was published."""

import os
import sys

from vlp.config import load_config
from vlp.train import checkpoint as ckpt
from vlp.train.trainer import Trainer

saves = {"n": 0}
original = ckpt.save_checkpoint


def dying_save(engine, root, step, meta, keep_last, **extra):
    saves["n"] += 1
    if saves["n"] < 2:
        return original(engine, root, step, meta, keep_last, **extra)
    engine.save_checkpoint(str(root), tag=f".tmp-{ckpt.tag_for(step)}", client_state={"vlp_step": step},
                           save_latest=False)
    os._exit(17)  # a kill: no cleanup, no publication


ckpt.save_checkpoint = dying_save
Trainer(load_config(sys.argv[1], sys.argv[2:])).fit()
