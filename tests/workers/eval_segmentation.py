"""Under torchrun (or alone): zero-shot, linear-probe and (2-step) DenseCLIP segmentation of a few clipart scenes with a
random-init tiny CLIP; writes each mode's confusion matrix and example predictions.

5 test scenes at batch 2 leave rank 1 a padding batch under 2 processes (rank 0: scenes 0-2, rank 1: 3-4).
"""

import sys

import torch
import torch.distributed as dist

from vlp.data.segmentation import load_segmentation_dataset
from vlp.data.tokenizer import get_tokenizer
from vlp.eval.common import make_context
from vlp.eval.segmentation import evaluate_segmentation
from vlp.models import create_model


def run_all() -> dict:
    torch.manual_seed(0)
    model = create_model("clip-nano", vision={"timm_kwargs": {"img_size": 32, "patch_size": 8}},
                         preprocess={"image_size": 32}).eval()
    tok = get_tokenizer(model.config.text)
    test = load_segmentation_dataset("clipart", "test", 5)
    train = load_segmentation_dataset("clipart", "train", 12)
    ctx = make_context("cpu", figures=False)
    out: dict = {}
    for mode in ("zeroshot", "linear_probe", "denseclip"):
        torch.manual_seed(0)
        res = evaluate_segmentation(model, tok, test, mode, batch_size=2, train_dataset=train, probe_epochs=5,
                                    num_examples=4, finetune_steps=2, denseclip_options={"batch_size": 4}, ctx=ctx)
        out[mode] = {"confusion_matrix": torch.tensor(res["confusion_matrix"]), "miou": res["miou"],
                     "examples": torch.stack([torch.from_numpy(e[1]) for e in res["examples"]])}
    return out


if __name__ == "__main__":
    dist.init_process_group("gloo")
    res = run_all()
    if dist.get_rank() == 1:  # a non-zero rank holds the summed matrix and rank 0's examples too
        torch.save(res, sys.argv[1])
    dist.destroy_process_group()
