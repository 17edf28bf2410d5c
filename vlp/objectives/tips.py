"""TIPS: one contrastive loss per text stream plus masked-image self-distillation from an EMA
teacher (iBOT's patch term and DINO's global term), in the module handed to deepspeed.initialize.

    student: image with a random subset of its patches replaced by the mask token (a `mask_prob`
             fraction of the images, `mask_ratio` of their patches) -> tokens, pooled streams;
             with contrastive_view=full the contrastive and global terms take an unmasked pass
             and a second pass over the masked images gives the patch term
    teacher: the full image through an EMA copy of the image side (no gradients)
    loss = sum_k stream_weights[k] * InfoNCE(stream k image, stream k text)
         + ibot_weight * CE(teacher patch | student patch, at masked positions)
         + dino_weight * CE(teacher pooled | student pooled, every stream)

The teacher is a frozen deep copy of the model without its text tower, a submodule of the task, so
DeepSpeed saves and restores it with the checkpoint and ZeRO 0-2 keep it whole on every rank (the
students' parameters are whole there too, so the EMA needs no communication). ZeRO-3 would
partition it, and bf16/fp16 would hold it in low precision: `supports` refuses both.
After optimizer step t of T the teacher follows the student with DINO's cosine momentum,
m_t = end - (end - start) * (1 + cos(pi t / T)) / 2.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlp.losses import ClipLoss
from vlp.losses.distill import Center, distill_cross_entropy, masked_patch_loss
from vlp.models.tips import TIPS, TIPSConfig
from vlp.objectives.base import Objective, ObjectiveError, ObjectiveModule, Supports
from vlp.objectives.registry import register_objective


@dataclass
class TipsOptions:
    """Section `tips:` of the run config: weights, masking, temperatures, centre and teacher EMA."""

    stream_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])  # one per data.text_streams
    ibot_weight: float = 1.0  # masked patch tokens vs the teacher's (iBOT)
    dino_weight: float = 1.0  # pooled tokens vs the teacher's (DINO global term)
    mask_prob: float = 0.5  # fraction of the images that are masked
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # masked fraction of a masked image's patches, uniform
    # masked: one student pass over the (partly masked) batch serves every term; full: the contrastive
    # and global terms see the unmasked images, a second pass over the masked ones the patch term
    contrastive_view: str = "masked"
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # sharpening
    center_momentum: float = 0.9  # running centre of the teacher's logits
    teacher_momentum: float = 0.996  # EMA momentum at step 0, cosine up to teacher_momentum_end
    teacher_momentum_end: float = 1.0


class TIPSModule(ObjectiveModule):
    def __init__(self, model: TIPS, cfg, total_steps: int, tile_size: int = 0, seed: int = 0) -> None:
        super().__init__(model, ClipLoss(tile_size=tile_size))
        if not isinstance(model, TIPS):
            raise TypeError(f"loss.name=tips needs a TIPS model, got {type(model).__name__}")
        if len(cfg.stream_weights) != model.config.num_streams:
            raise ValueError(f"tips.stream_weights has {len(cfg.stream_weights)} entries; the model has "
                             f"{model.config.num_streams} streams")
        self.cfg, self.total_steps = cfg, max(1, int(total_steps))
        self.teacher = copy.deepcopy(model)
        del self.teacher.text, self.teacher.text_proj
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        student = dict(model.named_parameters())
        self._pairs = [(name, p) for name, p in self.teacher.named_parameters()]
        missing = [n for n, _ in self._pairs if n not in student]
        if missing:
            raise ValueError(f"teacher parameters without a student counterpart: {missing[:5]}")
        self.seed = int(seed)
        # masks drawn so far: saved with the checkpoint, so a resumed run draws the masks it would have
        # drawn ([1], not 0-dim: DeepSpeed's parameter broadcast cannot view 0-dim tensors)
        self.register_buffer("mask_draws", torch.zeros(1, dtype=torch.int64))
        self.patch_center = Center(model.config.prototypes, cfg.center_momentum)
        self.global_center = Center(model.config.prototypes, cfg.center_momentum)

    def train(self, mode: bool = True) -> TIPSModule:
        super().train(mode)
        self.teacher.eval()  # no dropout / drop-path in the teacher
        return self

    def draw_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """Bool `[B, N]`: each image is masked with probability mask_prob, at a ratio drawn uniformly
        from mask_ratio, the patches chosen at random; seeded by (seed, rank, masks drawn so far)."""
        n = self.model.num_patches
        lo, hi = self.cfg.mask_ratio
        rank = dist.get_rank() if dist.is_initialized() else 0
        g = torch.Generator().manual_seed((self.seed << 40) ^ (rank << 32) ^ int(self.mask_draws.item()))
        self.mask_draws += 1
        chosen = torch.rand(batch, generator=g) < self.cfg.mask_prob
        counts = ((lo + (hi - lo) * torch.rand(batch, generator=g)) * n).round().long() * chosen
        order = torch.rand(batch, n, generator=g).argsort(dim=1).argsort(dim=1)  # a random rank per patch
        return (order < counts.unsqueeze(1)).to(device)

    def forward(self, image: torch.Tensor, text: torch.Tensor, kinds: torch.Tensor | None = None,
                features_only: bool = False) -> dict[str, torch.Tensor]:
        """`kinds`: per-sample prefix indices for a prefix-conditioned text tower (every stream's text
        takes its sample's prefix), else None."""
        if features_only:
            raise ValueError("loss.name=tips has no exact contrastive accumulation (use train.contrastive_accumulation=micro)")
        m, cfg = self.model, self.cfg
        if text.ndim == 2:
            text = text.unsqueeze(1)
        if text.shape[1] != m.config.num_streams:
            raise ValueError(f"batch has {text.shape[1]} text streams per image; the model has "
                             f"{m.config.num_streams} (set data.text_streams)")
        mask = self.draw_mask(image.shape[0], image.device) if self.training else None
        separate = cfg.contrastive_view == "full" and mask is not None
        tokens = m.patch_tokens(image, None if separate else mask)
        pooled = m.pool(tokens)
        img = F.normalize(m.project_streams(pooled), dim=-1)
        txt = m.encode_text_streams(text, normalize=True, kinds=kinds)
        scale = m.clamped_logit_scale()
        out: dict[str, torch.Tensor] = {"logit_scale": scale.detach()}
        loss = torch.zeros((), device=image.device)
        for k, w in enumerate(cfg.stream_weights):
            lk = self.loss(img[:, k], txt[:, k], scale)
            out[f"loss/stream{k}"] = lk.detach()
            loss = loss + w * lk
        if cfg.ibot_weight > 0 or cfg.dino_weight > 0:
            with torch.no_grad():
                t_tokens = self.teacher.patch_tokens(image)
                t_patch = self.teacher.head(t_tokens)
                t_global = self.teacher.head(self.teacher.pool(t_tokens))
            if mask is None:
                mask = torch.zeros(t_patch.shape[:2], dtype=torch.bool, device=image.device)
            if separate:  # a second student pass over the masked images only
                rows = mask.any(dim=1)
                masked = m.patch_tokens(image[rows], mask[rows])
                ibot = masked_patch_loss(m.head(masked[mask[rows]]), t_patch[rows], mask[rows],
                                         self.patch_center.center, cfg.student_temp, cfg.teacher_temp)
            else:
                ibot = masked_patch_loss(m.head(tokens[mask]), t_patch, mask, self.patch_center.center,
                                         cfg.student_temp, cfg.teacher_temp)
            dino = distill_cross_entropy(m.head(pooled).flatten(0, 1), t_global.flatten(0, 1),
                                         self.global_center.center, cfg.student_temp, cfg.teacher_temp).mean()
            loss = loss + cfg.ibot_weight * ibot + cfg.dino_weight * dino
            out["loss/ibot"], out["loss/dino"] = ibot.detach(), dino.detach()
            if self.training:
                self.patch_center.update(t_patch)
                self.global_center.update(t_global)
        out["loss"] = loss
        return out

    def teacher_momentum(self, step: int) -> float:
        start, end = self.cfg.teacher_momentum, self.cfg.teacher_momentum_end
        return end - (end - start) * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps)) / 2

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Move the teacher towards the student after optimizer step `step` (1-based)."""
        mom = self.teacher_momentum(step)
        student = dict(self.model.named_parameters())
        for name, t in self._pairs:
            t.lerp_(student[name].detach().to(t.dtype), 1.0 - mom)


class TIPSObjective(Objective):
    name = "tips"
    example = ("model.name=tips-nano", "data.text_streams=[txt,syn.txt]")
    options = TipsOptions
    supports = Supports(exact_accumulation=False, zero_stages=(0, 1, 2), precisions=("fp32",), text_streams=True, why={
        "zero_stage": "its EMA teacher is kept whole on every rank; ZeRO-3 would partition it",
        "precision": "the EMA teacher would be held (and averaged) in low precision",
        "contrastive_accumulation": "the self-distillation terms are taken per micro-batch"})

    def validate(self, cfg, bad) -> None:
        t = cfg.tips
        if not cfg.data.text_streams:
            bad("data.text_streams", "loss.name=tips needs one text key per stream, e.g. [txt, syn.txt]")
        if len(t.stream_weights) != len(cfg.data.text_streams):
            bad("tips.stream_weights", f"has {len(t.stream_weights)} entries for {len(cfg.data.text_streams)} "
                "data.text_streams")
        for key in ("ibot_weight", "dino_weight"):
            if t[key] < 0:
                bad(f"tips.{key}", f"must be >= 0, got {t[key]}")
        if any(w < 0 for w in t.stream_weights):
            bad("tips.stream_weights", "must be >= 0")
        if t.contrastive_view not in ("masked", "full"):
            bad("tips.contrastive_view", f"must be masked or full, got '{t.contrastive_view}'")
        if not 0.0 <= t.mask_prob <= 1.0:
            bad("tips.mask_prob", f"must be in [0, 1], got {t.mask_prob}")
        lo, hi = t.mask_ratio
        if not 0.0 <= lo <= hi < 1.0:
            bad("tips.mask_ratio", f"must satisfy 0 <= min <= max < 1, got {list(t.mask_ratio)}")
        for key in ("student_temp", "teacher_temp"):
            if not t[key] > 0:
                bad(f"tips.{key}", f"must be > 0, got {t[key]}")
        if not 0.0 <= t.center_momentum < 1.0:
            bad("tips.center_momentum", f"must be in [0, 1), got {t.center_momentum}")
        if not 0.0 <= t.teacher_momentum <= t.teacher_momentum_end <= 1.0:
            bad("tips.teacher_momentum", "must satisfy 0 <= teacher_momentum <= teacher_momentum_end <= 1")

    def check_model(self, model_cfg, cfg) -> None:
        if not isinstance(model_cfg, TIPSConfig):
            raise ObjectiveError(f"loss.name=tips needs a TIPS model; '{cfg.model.name}' is not one (use a tips-* preset)")
        if model_cfg.num_streams != len(cfg.data.text_streams):
            raise ObjectiveError(f"model '{cfg.model.name}' has {model_cfg.num_streams} image streams but "
                                 f"data.text_streams lists {len(cfg.data.text_streams)} texts")

    def build(self, model, cfg, total_steps: int) -> ObjectiveModule:
        return TIPSModule(model, cfg.tips, total_steps, tile_size=cfg.loss.tile_size, seed=cfg.train.seed)


register_objective(TIPSObjective())
