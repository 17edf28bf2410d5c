"""One typed config tree for training runs.

YAML presets and dotted command-line overrides are merged onto the dataclasses below with
OmegaConf in struct mode, so a key that does not exist or a value of the wrong type is refused
before any work starts, and the error names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key or file."""


@dataclass
class ModelSection:
    # name of a registered preset (see `vlp.list_models()`)
    name: str = "clip-tiny"
    # field overrides applied onto the preset, e.g. {text: {layers: 4}}; validated against the preset
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossSection:
    # clip: softmax InfoNCE over the gathered global batch; siglip: pairwise sigmoid, ring exchange;
    # coca: InfoNCE + captioning; tips: InfoNCE per text stream + masked-image self-distillation (tips.*)
    name: str = "clip"
    # > 0: softmax in row blocks / sigmoid in column tiles, loss memory about local batch x tile_size
    # instead of local x global (exact, not an approximation)
    tile_size: int = 0
    # coca: loss = clip_weight * InfoNCE + caption_weight * next-token cross-entropy
    clip_weight: float = 1.0
    caption_weight: float = 2.0


@dataclass
class TipsSection:
    """loss.name=tips (vlp/train/tips_task.py): weights, masking, temperatures, centre and teacher EMA."""

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


@dataclass
class SourceSection:
    """One entry of data.sources (see vlp/data/mixture.py)."""

    name: str = ""
    shards: str = ""  # same syntax as data.train_shards
    weight: float = 1.0  # relative share of the mixed stream
    kind: str = "caption"  # caption | label | multi_text
    text_key: str = "txt"  # caption / multi_text: member(s) holding the text, first present of "a;b"
    image_key: str = "jpg;png;webp;jpeg"
    label_key: str = "cls"  # label: member holding the class id
    classnames: list[str] = field(default_factory=list)  # label: class id -> name
    classnames_from: str = ""  # label: a built-in dataset's class names (fashion-mnist, digits)
    templates: list[str] = field(default_factory=list)  # label: "a photo of a {}."; default built-in
    # prefix-conditioned models (model text.prefix_kinds): the prefix this source's texts get;
    # "" = the source's kind (caption, label, multi_text)
    prefix: str = ""


@dataclass
class DataSection:
    # brace-expanded shard list(s): local paths or `pipe:` commands; several joined with "::"
    train_shards: str = ""
    # weighted mixture of sources instead of train_shards (each sample read at most once per epoch)
    sources: list[SourceSection] = field(default_factory=list)
    # epochs: each sample at most once per epoch; resample: sources' samples drawn with replacement
    # by weight, a virtual epoch of train_num_samples draws (0: the sources' total) (docs/data.md)
    mixture: str = "epochs"
    # number of samples in the training shards; used for epochs -> steps when set (0 = read manifest)
    train_num_samples: int = 0
    batch_size: int = 256  # per rank (micro-batch per GPU)
    workers: int = 2
    shuffle_buffer: int = 2000
    # random resized crop scale range (open_clip_train's; 0.6 cost 5.5 points of zero-shot, issue 13)
    crop_scale: tuple[float, float] = (0.9, 1.0)
    image_key: str = "jpg;png;webp;jpeg"
    text_key: str = "txt"
    # several texts per image, one per stream (loss.name=tips): each entry a text key ("a;b": first
    # present); batches then carry text [B, streams, context]. Empty: one text (text_key)
    text_streams: list[str] = field(default_factory=list)
    # captions longer than this many characters are cut to it (counted as caption_truncated)
    max_caption_chars: int = 2000
    # decode JPEGs at a reduced DCT scale when the crop is far larger than the output size
    jpeg_draft: bool = True
    # a shard that cannot be opened is retried this many times (with backoff), then skipped
    shard_retries: int = 2
    # write the keys of every optimizer step's samples to run_dir/consumed/rank*.jsonl (audit)
    log_consumed_keys: bool = False


@dataclass
class OptimSection:
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    # final lr as a fraction of the peak lr at the end of the cosine
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    # true: position and token embeddings get weight decay, as open_clip_train's grouping does
    # (class / register tokens, norms, biases and the logit scale stay exempt either way)
    decay_embeddings: bool = False


@dataclass
class EvalEntry:
    task: str = "zeroshot"  # a name in vlp.eval.tasks: zeroshot, retrieval, linear_probe, segmentation
    dataset: str = "fashion-mnist"
    split: str = "test"
    every_n_steps: int = 0  # 0: only at the end of training
    batch_size: int = 256
    max_samples: int = 0  # 0: all
    ema: bool = False  # evaluate the EMA weights (needs ema.enabled) instead of the live ones
    # task-specific knobs passed to the evaluator, e.g. linear_probe {k_shot: 10, train_samples: 5000}
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainSection:
    # total optimizer steps; if 0, computed from epochs and data.train_num_samples
    steps: int = 0
    epochs: float = 1.0
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    zero_stage: int = 0
    gradient_accumulation_steps: int = 1
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 0  # 0: only at the end
    keep_last_n_checkpoints: int = 2
    # end this invocation after this many optimizer steps (with a checkpoint), e.g. for
    # time-sliced jobs; resume with --resume latest. 0: run to train.steps
    stop_after_steps: int = 0
    # torch.compile the model (nn.Module.compile, state-dict keys unchanged) with this backend
    compile: bool = False
    compile_backend: str = "inductor"
    progress_bar: bool = True
    # micro: each micro-batch is its own contrastive batch (negatives from that micro-batch only);
    # exact: features of all gradient_accumulation_steps micro-batches are computed without a
    # graph, the loss is taken on all of them together, then each micro-batch is re-forwarded and
    # backpropagated with its feature gradients (GradCache): the gradient of one k-times-larger batch
    contrastive_accumulation: str = "micro"
    # recompute tower activations in the backward (timm's set_grad_checkpointing for the image
    # tower, non-reentrant torch.utils.checkpoint per text block): less memory, ~1/3 more compute
    grad_checkpointing: bool = False


@dataclass
class LockSection:
    """LiT-style locking: locked parameters get no gradient and no optimizer state and their
    modules run in eval mode (no dropout, frozen norm statistics) also during training. The
    projections into the shared embedding space stay trainable."""

    image: bool = False
    # > 0: keep the last N of timm's layer groups of the image trunk trainable (ViT: group 0 is the
    # patch/position embedding, 1..depth the blocks, the last the final norm)
    image_unlocked_groups: int = 0
    image_unlock_norms: bool = False  # keep every normalization layer of the locked part trainable
    text: bool = False
    # > 0: keep the last N text groups trainable (embeddings, blocks 0..layers-1, final norm)
    text_unlocked_groups: int = 0
    text_unlock_norms: bool = False


@dataclass
class EmaSection:
    """Exponential moving average of the weights, kept in fp32, saved with every checkpoint."""

    enabled: bool = False
    decay: float = 0.9999
    # before this optimizer step the EMA is a copy of the weights
    start_step: int = 0
    # ramp the decay as min(decay, (1 + n) / (10 + n)), n = EMA updates since start_step
    warmup: bool = False
    update_every_n_steps: int = 1


@dataclass
class LoggingSection:
    wandb: bool = False
    wandb_project: str = "vlp"
    wandb_mode: str = "offline"  # online | offline | disabled


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    tips: TipsSection = field(default_factory=TipsSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    lock: LockSection = field(default_factory=LockSection)
    ema: EmaSection = field(default_factory=EmaSection)
    evals: dict[str, EvalEntry] = field(default_factory=dict)


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    where = f"key '{key}'" if key else "config"
    return ConfigError(f"{source}: {where}: {msg}")


def _schema() -> DictConfig:
    cfg = OmegaConf.structured(RunConfig)
    OmegaConf.set_struct(cfg, True)
    # open mappings: eval names are the user's; model overrides are checked against the preset
    OmegaConf.set_struct(cfg.evals, False)
    OmegaConf.set_struct(cfg.model.overrides, False)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> DictConfig:
    """Build the run config: dataclass defaults <- `base` (a saved config) <- YAML file <- overrides."""
    cfg = _schema() if base is None else from_container(base)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(p))
        except OmegaConfBaseException as e:
            raise _explain(e, str(path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, f"override '{item}'") from None
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that types alone cannot express; each error names the key."""
    def bad(key: str, why: str) -> None:
        raise ConfigError(f"key '{key}': {why}")

    if cfg.loss.name not in ("clip", "siglip", "coca", "tips"):
        bad("loss.name", f"unknown loss '{cfg.loss.name}' (known: clip, siglip, coca, tips)")
    if cfg.loss.name == "tips":
        _validate_tips(cfg, bad)
    elif cfg.data.text_streams:
        bad("data.text_streams", f"several texts per image are used only by loss.name=tips, not '{cfg.loss.name}'")
    if cfg.loss.tile_size < 0:
        bad("loss.tile_size", f"must be >= 0, got {cfg.loss.tile_size}")
    for key in ("clip_weight", "caption_weight"):
        if cfg.loss[key] < 0:
            bad(f"loss.{key}", f"must be >= 0, got {cfg.loss[key]}")
    if cfg.train.precision not in ("fp32", "bf16", "fp16"):
        bad("train.precision", f"must be fp32, bf16 or fp16, got '{cfg.train.precision}'")
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        bad("train.zero_stage", f"must be 0, 1, 2 or 3, got {cfg.train.zero_stage}")
    if cfg.train.precision != "fp32" and cfg.train.zero_stage == 0:
        # at stage 0 DeepSpeed keeps the fp32 master weights in unnamed lists that cannot be
        # consolidated into a named fp32 export
        bad("train.precision", f"{cfg.train.precision} needs train.zero_stage >= 1 (ZeRO keeps named fp32 master weights)")
    if cfg.data.batch_size <= 0:
        bad("data.batch_size", "must be positive")
    if cfg.data.mixture not in ("epochs", "resample"):
        bad("data.mixture", f"must be epochs or resample, got '{cfg.data.mixture}'")
    if cfg.train.steps < 0 or cfg.train.epochs <= 0 and cfg.train.steps == 0:
        bad("train.steps", "set train.steps > 0 or train.epochs > 0")
    if cfg.train.gradient_accumulation_steps < 1:
        bad("train.gradient_accumulation_steps", "must be >= 1")
    if cfg.train.contrastive_accumulation not in ("micro", "exact"):
        bad("train.contrastive_accumulation", f"must be micro or exact, got '{cfg.train.contrastive_accumulation}'")
    if cfg.train.contrastive_accumulation == "exact" and cfg.loss.name == "coca":
        bad("train.contrastive_accumulation", "exact accumulation covers the contrastive losses; "
            "loss.name=coca also needs its caption logits per micro-batch (use micro)")
    for tower in ("image", "text"):
        n = cfg.lock[f"{tower}_unlocked_groups"]
        if n < 0 or (n and not cfg.lock[tower]):
            bad(f"lock.{tower}_unlocked_groups", f"must be >= 0, and is only used with lock.{tower}=true")
        if cfg.lock[f"{tower}_unlock_norms"] and not cfg.lock[tower]:
            bad(f"lock.{tower}_unlock_norms", f"is only used with lock.{tower}=true")
    if cfg.ema.enabled:
        if not 0.0 <= cfg.ema.decay < 1.0:
            bad("ema.decay", f"must be in [0, 1), got {cfg.ema.decay}")
        if cfg.ema.start_step < 0:
            bad("ema.start_step", "must be >= 0")
        if cfg.ema.update_every_n_steps < 1:
            bad("ema.update_every_n_steps", "must be >= 1")
    lo, hi = cfg.data.crop_scale
    if not 0 < lo <= hi <= 1:
        bad("data.crop_scale", f"must satisfy 0 < min <= max <= 1, got {list(cfg.data.crop_scale)}")
    if cfg.data.max_caption_chars < 0 or cfg.data.shard_retries < 0:
        bad("data.max_caption_chars" if cfg.data.max_caption_chars < 0 else "data.shard_retries", "must be >= 0")
    if cfg.logging.wandb_mode not in ("online", "offline", "disabled"):
        bad("logging.wandb_mode", "must be online, offline or disabled")
    from vlp.eval.tasks import UnknownTaskError, get_task

    for name, ev in cfg.evals.items():
        try:
            get_task(ev.task)
        except UnknownTaskError as e:
            bad(f"evals.{name}.task", str(e))
        if ev.every_n_steps < 0:
            bad(f"evals.{name}.every_n_steps", "must be >= 0 (0: only at the end of training)")
        if ev.ema and not cfg.ema.enabled:
            bad(f"evals.{name}.ema", "evaluating EMA weights needs ema.enabled=true")


def _validate_tips(cfg: DictConfig, bad) -> None:
    t = cfg.tips
    if cfg.train.zero_stage == 3:
        bad("train.zero_stage", "loss.name=tips keeps its EMA teacher whole on every rank; ZeRO-3 would partition "
            "it (use zero_stage 0, 1 or 2)")
    if cfg.train.precision != "fp32":
        bad("train.precision", "loss.name=tips needs fp32: the EMA teacher would be held (and averaged) in "
            f"{cfg.train.precision}")
    if cfg.train.contrastive_accumulation != "micro":
        bad("train.contrastive_accumulation", "loss.name=tips supports micro only")
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


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_container(d: dict) -> DictConfig:
    """Re-type a config saved in a checkpoint, refusing keys this version does not know."""
    cfg = _schema()
    try:
        return OmegaConf.merge(cfg, d)
    except OmegaConfBaseException as e:
        raise _explain(e, "saved config") from None
