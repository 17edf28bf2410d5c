"""One typed config tree for training runs.

YAML presets and dotted command-line overrides are merged onto the dataclasses below with
OmegaConf in struct mode, so a key that does not exist or a value of the wrong type is refused
before any work starts, and the error names the key.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlp.extras import is_installed, missing_message
from vlp.objectives import Objective, UnknownObjectiveError, get_objective, objectives


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key or file."""


@dataclass
class InitFromSection:
    """Start from pretrained weights instead of a random init (vlp/interop/pretrained.py). A resumed
    run never re-initialises: its checkpoint's weights are used and this section is ignored."""

    # a vlp run dir / .safetensors / checkpoint dir, an open_clip or OpenAI state dict or open_clip
    # folder, a transformers CLIP/SigLIP folder, or timm weights (image trunk); "" = random init
    path: str = ""
    format: str = "auto"  # auto | vlp | open_clip | openai | hf | timm
    # the model parts to copy (image, text, logit; CoCa also decoder); empty: every part the source holds
    parts: list[str] = field(default_factory=list)
    ema: bool = False  # vlp runs: start from their EMA weights
    # source tensors of the chosen parts that the model has no place for are refused (false: listed)
    strict: bool = True


@dataclass
class ModelSection:
    # name of a registered preset (see `vlp.list_models()`)
    name: str = "clip-tiny"
    # field overrides applied onto the preset, e.g. {text: {layers: 4}}; validated against the preset
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: InitFromSection = field(default_factory=InitFromSection)


@dataclass
class LossSection:
    # the training objective, a name in the objective registry (vlp/objectives/): clip (softmax
    # InfoNCE over the gathered global batch), siglip (pairwise sigmoid, ring exchange), coca (InfoNCE
    # + captioning, options in `coca:`), tips (InfoNCE per text stream + masked-image self-distillation,
    # options in `tips:`). An objective's own options are the top-level section named after it.
    name: str = "clip"
    # > 0: softmax in row blocks / sigmoid in column tiles, loss memory about local batch x tile_size
    # instead of local x global (exact, not an approximation)
    tile_size: int = 0


@dataclass
class SourceSection:
    """One entry of data.sources (see vlp/data/mixture.py)."""

    name: str = ""
    shards: str = ""  # same syntax as data.train_shards
    weight: float = 1.0  # relative share of the mixed stream
    kind: str = "caption"  # caption | label | multi_text
    # caption / multi_text: member(s) holding the text, first present of "a;b"; multi_text "a+b": one of
    # the members a and b drawn per sample and epoch (alt-text or a synthetic caption, vlp.curate caption)
    text_key: str = "txt"
    image_key: str = "jpg;png;webp;jpeg"
    label_key: str = "cls"  # label: member holding the class id
    classnames: list[str] = field(default_factory=list)  # label: class id -> name
    classnames_from: str = ""  # label: a built-in dataset's class names (fashion-mnist, digits)
    templates: list[str] = field(default_factory=list)  # label: "a photo of a {}."; default built-in
    # prefix-conditioned models (model text.prefix_kinds): the prefix this source's texts get;
    # "" = the source's kind (caption, label, multi_text)
    prefix: str = ""
    # a selection of this source's samples (`python -m vlp.curate select`): the others are passed over
    select: str = ""


@dataclass
class DataSection:
    # brace-expanded shard list(s): local paths or `pipe:` commands; several joined with "::"
    train_shards: str = ""
    # weighted mixture of sources instead of train_shards (each sample read at most once per epoch)
    sources: list[SourceSection] = field(default_factory=list)
    # train_shards only: train on a selection of its samples (`python -m vlp.curate select`; vlp/data/selection.py)
    select: str = ""
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
    # several texts per image, one per stream (objectives that support it, e.g. loss.name=tips): each
    # entry a text key ("a;b": first present); batches then carry text [B, streams, context]. Empty: one text (text_key)
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
class NonFiniteSection:
    """What a step with a non-finite gradient does (its optimizer step is never applied): skip it and
    go on; rewind to the last checkpoint and train on without the step's samples; or stop. Under
    fp16 a skipped step with finite losses is DeepSpeed's loss-scale search and does not count."""

    policy: str = "skip"  # skip | rewind | stop
    # stop after this many non-finite steps in a row (skip), or this many rewinds to one checkpoint
    max_in_a_row: int = 5


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
    # also checkpoint when this many minutes passed since the last save (any rank's clock; 0: off)
    checkpoint_every_n_minutes: float = 0.0
    # on these signals every rank finishes its optimizer step, a checkpoint is written and the
    # process exits with preempt_exit_code (torchrun --max-restarts / a requeue resumes it)
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    preempt_exit_code: int = 75
    nonfinite: NonFiniteSection = field(default_factory=NonFiniteSection)
    # a rank whose step makes no progress for this long (data wait, forward, a collective) reports
    # its stage and shards and exits (code 76) so torchrun restarts the group; evals and saves
    # pause it. 0: off
    watchdog_minutes: float = 30.0
    # timeout of the process group's collectives (gloo, NCCL) and of joining it
    collective_timeout_minutes: float = 30.0
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
    # DeepSpeed config keys merged into the one vlp generates (mappings key by key), e.g.
    # {zero_optimization: {overlap_comm: true, reduce_bucket_size: 5e8}}; the keys vlp derives from
    # its own settings (batch size, accumulation, clipping, ZeRO stage, precision, optimizer,
    # scheduler) are refused with the key to set instead; checked by DeepSpeed's own parser
    deepspeed: dict[str, Any] = field(default_factory=dict)


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
    # modules imported before the config is checked, e.g. one that registers an objective or eval task
    # (`vlp.objectives.register_objective`, `vlp.eval.tasks.register_task`); saved with the run, so a
    # resumed run imports them again
    plugins: list[str] = field(default_factory=list)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
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


# keys that moved into an objective's section: old saved configs are migrated, user input is told
_MOVED = {"loss.clip_weight": "coca.clip_weight", "loss.caption_weight": "coca.caption_weight"}


def _schema() -> DictConfig:
    sections = []
    for objective in objectives():  # each objective's options: the section named after it
        if objective.options is not None:
            if objective.name in RunConfig.__dataclass_fields__:
                raise ConfigError(f"objective '{objective.name}' cannot have options: '{objective.name}' is "
                                  "already a section of the run config")
            sections.append((objective.name, objective.options, field(default_factory=objective.options)))
    cfg = OmegaConf.structured(make_dataclass("RunConfig", sections, bases=(RunConfig,)))
    OmegaConf.set_struct(cfg, True)
    # open mappings: eval names are the user's; model overrides are checked against the preset
    OmegaConf.set_struct(cfg.evals, False)
    OmegaConf.set_struct(cfg.model.overrides, False)
    # DeepSpeed's own keys: checked by DeepSpeed's parser (vlp.train.engine.check_deepspeed_overrides)
    OmegaConf.set_struct(cfg.train.deepspeed, False)
    return cfg


def _moved_keys(raw: DictConfig, source: str) -> None:
    for old, new in _MOVED.items():
        if OmegaConf.select(raw, old) is not None:
            raise ConfigError(f"{source}: key '{old}' is now '{new}'")


def _migrate(saved: dict) -> dict:
    """A config saved by an earlier version, with moved keys put where they are now."""
    out = OmegaConf.create(saved)
    for old, new in _MOVED.items():
        value = OmegaConf.select(out, old)
        if value is not None:
            section, key = old.split(".")
            del out[section][key]
            OmegaConf.update(out, new, value, force_add=True)
    return OmegaConf.to_container(out)  # type: ignore[return-value]


def import_plugins(names: list[str], source: str = "plugins") -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of a user module is reported as its own
            raise ConfigError(f"{source}: cannot import plugin module '{name}': {type(e).__name__}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> DictConfig:
    """Build the run config: dataclass defaults <- `base` (a saved config) <- YAML file <- overrides.

    The modules listed in `plugins` (from any of the three) are imported first, so that the
    objectives and eval tasks they register are known when the config is checked."""
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            layers.append((str(path), OmegaConf.load(p)))
        except OmegaConfBaseException as e:
            raise _explain(e, str(path)) from None
    emptied: dict[str, str] = {}  # source -> key: `key={}` empties the mapping (a merge would keep it)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if value.strip() == "{}":
            emptied[f"override '{item}'"] = key.lstrip("+")
        try:
            layers.append((f"override '{item}'", OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as e:
            raise _explain(e, f"override '{item}'") from None
    plugins = list((base or {}).get("plugins") or [])
    for source, layer in layers:
        _moved_keys(layer, source)
        plugins = list(OmegaConf.select(layer, "plugins", default=None) or plugins)
    import_plugins(plugins)
    cfg = _schema() if base is None else from_container(base)
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
            if source in emptied and isinstance(OmegaConf.select(cfg, emptied[source]), DictConfig):
                OmegaConf.update(cfg, emptied[source], {}, merge=False)
        except OmegaConfBaseException as e:
            raise _explain(e, source) from None
    validate(cfg)
    return cfg


def _bad(key: str, why: str) -> NoReturn:
    raise ConfigError(f"key '{key}': {why}")


def validate(cfg: DictConfig) -> None:
    """Checks that types alone cannot express; each error names the key."""
    try:
        objective = get_objective(cfg.loss.name)
    except UnknownObjectiveError as e:
        _bad("loss.name", str(e))
    if cfg.loss.tile_size < 0:
        _bad("loss.tile_size", f"must be >= 0, got {cfg.loss.tile_size}")
    _check_train(cfg)
    _check_data(cfg)
    _check_supports(cfg, objective, _bad)
    objective.validate(cfg, _bad)
    _check_lock_and_ema(cfg)
    _check_init_from(cfg)
    if cfg.logging.wandb_mode not in ("online", "offline", "disabled"):
        _bad("logging.wandb_mode", "must be online, offline or disabled")
    if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled" and not is_installed("wandb"):
        _bad("logging.wandb", missing_message("wandb", "logging.wandb=true"))
    _check_evals(cfg)


def _check_train(cfg: DictConfig) -> None:
    if cfg.train.precision not in ("fp32", "bf16", "fp16"):
        _bad("train.precision", f"must be fp32, bf16 or fp16, got '{cfg.train.precision}'")
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        _bad("train.zero_stage", f"must be 0, 1, 2 or 3, got {cfg.train.zero_stage}")
    if cfg.train.precision != "fp32" and cfg.train.zero_stage == 0:
        # at stage 0 DeepSpeed keeps the fp32 master weights in unnamed lists that cannot be
        # consolidated into a named fp32 export
        _bad("train.precision",
             f"{cfg.train.precision} needs train.zero_stage >= 1 (ZeRO keeps named fp32 master weights)")
    if cfg.train.steps < 0 or cfg.train.epochs <= 0 and cfg.train.steps == 0:
        _bad("train.steps", "set train.steps > 0 or train.epochs > 0")
    if cfg.train.gradient_accumulation_steps < 1:
        _bad("train.gradient_accumulation_steps", "must be >= 1")
    if cfg.train.contrastive_accumulation not in ("micro", "exact"):
        _bad("train.contrastive_accumulation", f"must be micro or exact, got '{cfg.train.contrastive_accumulation}'")


def _check_lock_and_ema(cfg: DictConfig) -> None:
    for tower in ("image", "text"):
        n = cfg.lock[f"{tower}_unlocked_groups"]
        if n < 0 or (n and not cfg.lock[tower]):
            _bad(f"lock.{tower}_unlocked_groups", f"must be >= 0, and is only used with lock.{tower}=true")
        if cfg.lock[f"{tower}_unlock_norms"] and not cfg.lock[tower]:
            _bad(f"lock.{tower}_unlock_norms", f"is only used with lock.{tower}=true")
    if cfg.ema.enabled:
        if not 0.0 <= cfg.ema.decay < 1.0:
            _bad("ema.decay", f"must be in [0, 1), got {cfg.ema.decay}")
        if cfg.ema.start_step < 0:
            _bad("ema.start_step", "must be >= 0")
        if cfg.ema.update_every_n_steps < 1:
            _bad("ema.update_every_n_steps", "must be >= 1")


def _check_init_from(cfg: DictConfig) -> None:
    from vlp.interop.pretrained import FORMATS

    init = cfg.model.init_from
    if init.format not in FORMATS:
        _bad("model.init_from.format", f"must be one of {', '.join(FORMATS)}, got '{init.format}'")
    if not init.path and (init.parts or init.ema or init.format != "auto"):
        _bad("model.init_from.path", "is empty, but other model.init_from keys are set")


def _check_data(cfg: DictConfig) -> None:
    if cfg.data.batch_size <= 0:
        _bad("data.batch_size", "must be positive")
    if cfg.data.mixture not in ("epochs", "resample"):
        _bad("data.mixture", f"must be epochs or resample, got '{cfg.data.mixture}'")
    lo, hi = cfg.data.crop_scale
    if not 0 < lo <= hi <= 1:
        _bad("data.crop_scale", f"must satisfy 0 < min <= max <= 1, got {list(cfg.data.crop_scale)}")
    if cfg.data.max_caption_chars < 0 or cfg.data.shard_retries < 0:
        _bad("data.max_caption_chars" if cfg.data.max_caption_chars < 0 else "data.shard_retries", "must be >= 0")


def _check_evals(cfg: DictConfig) -> None:
    from vlp.eval.tasks import EvalOptionError, UnknownTaskError, check_options, get_task

    for name, ev in cfg.evals.items():
        try:
            get_task(ev.task)
        except UnknownTaskError as e:
            _bad(f"evals.{name}.task", str(e))
        try:
            check_options(ev.task, ev.options)
        except EvalOptionError as e:
            _bad(f"evals.{name}.options", str(e))
        if ev.every_n_steps < 0:
            _bad(f"evals.{name}.every_n_steps", "must be >= 0 (0: only at the end of training)")
        if ev.ema and not cfg.ema.enabled:
            _bad(f"evals.{name}.ema", "evaluating EMA weights needs ema.enabled=true")


def _check_supports(cfg: DictConfig, objective: Objective, bad) -> None:
    """The run config against what the objective declares it supports (`Supports`)."""
    s, name = objective.supports, objective.name

    def why(key: str) -> str:
        return f": {s.why[key]}" if key in s.why else ""

    if cfg.train.zero_stage not in s.zero_stages:
        bad("train.zero_stage", f"loss.name={name} supports ZeRO stages {', '.join(map(str, s.zero_stages))}, "
            f"not {cfg.train.zero_stage}{why('zero_stage')}")
    if cfg.train.precision not in s.precisions:
        bad("train.precision", f"loss.name={name} supports precision {', '.join(s.precisions)}, not "
            f"{cfg.train.precision}{why('precision')}")
    if cfg.train.contrastive_accumulation == "exact" and not s.exact_accumulation:
        bad("train.contrastive_accumulation", f"loss.name={name} has no exact accumulation (use micro)"
            f"{why('contrastive_accumulation')}")
    if cfg.data.text_streams and not s.text_streams:
        users = [o.name for o in objectives() if o.supports.text_streams]
        bad("data.text_streams", f"several texts per image are used only by loss.name={' or '.join(users)}, "
            f"not '{name}'")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_container(d: dict) -> DictConfig:
    """Re-type a config saved in a checkpoint, refusing keys this version does not know."""
    import_plugins(list(d.get("plugins") or []), "saved config: plugins")
    cfg = _schema()
    try:
        return OmegaConf.merge(cfg, _migrate(d))
    except OmegaConfBaseException as e:
        raise _explain(e, "saved config") from None
