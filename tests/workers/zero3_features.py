"""Run under torchrun: train clip-nano with ZeRO-3 for a few steps, then save the live model's image
features (pooled, intermediates, dense) on a fixed batch, to compare with `vlp.load_backbone` on the
DeepSpeed checkpoint the run wrote."""

import sys

import deepspeed
import torch
import torch.distributed as dist

from vlp.config import load_config
from vlp.models import CLIP
from vlp.train.trainer import Trainer


def fixed_images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(123))


def main() -> None:
    out, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    trainer = Trainer(load_config(config, overrides))
    trainer.fit()
    model = trainer.engine.module.model
    model.eval()
    # gather the live ZeRO-3 partitions (collective) into a plain copy: ZeRO-3's forward hooks would
    # re-partition the weights between calls, so the features are computed outside DeepSpeed
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain = CLIP(model.config).eval()
    plain.load_state_dict(weights, strict=True)
    with torch.no_grad():
        x = fixed_images()
        tokens = plain.visual.trunk.forward_features(x)
        live = {
            "pooled": plain.visual(x),
            "image_embed": plain.encode_image(x),
            "intermediates": plain.visual.trunk.forward_intermediates(
                x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True),
            "dense": plain.image_proj(plain.visual.trunk.fc_norm(tokens)),
        }
    if dist.get_rank() == 0:
        torch.save(live, out)
    dist.barrier()


if __name__ == "__main__":
    main()
