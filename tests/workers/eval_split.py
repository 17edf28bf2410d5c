"""Under torchrun: zero-shot eval of the same random clip-nano on digits, split across ranks."""

import sys

import torch
import torch.distributed as dist

from vlp.data.sources import load_eval_dataset
from vlp.data.tokenizer import get_tokenizer
from vlp.eval.zeroshot import zeroshot_predictions
from vlp.models import create_model


def predict() -> torch.Tensor:
    torch.manual_seed(0)
    model = create_model("clip-nano")
    data = load_eval_dataset("digits", "test")
    return zeroshot_predictions(model, get_tokenizer(model.config.text), data, model.preprocess, batch_size=40)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    logits = predict()
    if dist.get_rank() == 0:
        torch.save(logits, sys.argv[1])
    dist.destroy_process_group()
