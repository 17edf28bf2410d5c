"""Build a Trainer and write what its DeepSpeed engine parsed from the config (ZeRO settings, the
optimizer class), as JSON: `python tests/workers/engine_config.py OUT.json SHARDS_DIR OVERRIDE...`."""

from __future__ import annotations

import json
import sys


def main() -> None:
    out, shards, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    from vlp.config import load_config
    from vlp.train.trainer import Trainer

    cfg = load_config("tests/configs/digits_nano.yaml", [
        f"run_dir={out}.run", f"data.train_shards={shards}/train.json", "evals={}", *overrides])
    engine = Trainer(cfg).engine
    zero = engine._config.zero_config
    info = {"stage": engine.zero_optimization_stage(), "reduce_bucket_size": zero.reduce_bucket_size,
            "overlap_comm": zero.overlap_comm, "offload_optimizer": str(zero.offload_optimizer.device
                                                                        if zero.offload_optimizer else None),
            "optimizer": type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer")
                              else engine.optimizer).__name__}
    with open(out, "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
