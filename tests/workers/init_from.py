"""Build a Trainer for each `model.init_from` case (one process, or each rank under torchrun) and
save the weights its engine starts from (gathered on rank 0; ZeRO-3 partitions are gathered first).

    python tests/workers/init_from.py OUT.pt CASES.json SHARDS_DIR ZERO_STAGE

CASES.json: {name: [dotted overrides]}; OUT.pt: {name: {key: tensor}} written by rank 0.
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    out, cases_file, shards, stage = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    from vlp.config import load_config
    from vlp.train.engine import full_state_dict
    from vlp.train.trainer import Trainer

    results = {}
    for name, overrides in json.loads(open(cases_file).read()).items():
        cfg = load_config("tests/configs/digits_nano.yaml", [
            f"run_dir={out}.runs/{name}", f"data.train_shards={shards}/train.json", "evals={}",
            f"train.zero_stage={stage}", *overrides])
        trainer = Trainer(cfg)
        sd = full_state_dict(trainer.engine, trainer.model)
        if sd is not None:
            results[name] = sd
        del trainer
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
