"""The training loop: config -> model, data, engine -> steps, checkpoints, evals -> export.

Everything that can be checked cheaply (config, shard paths, step budget, a resumed
checkpoint's model) is checked in `Trainer.__init__` before DeepSpeed starts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from vlp.config import to_container, to_yaml
from vlp.data.mixture import source_specs
from vlp.data.pipeline import (
    DataPosition,
    LegacyPositionError,
    build_train_loader,
    expand_shards,
    is_report_only,
)
from vlp.data.selection import selected_total, selection_fingerprints
from vlp.data.tokenizer import get_tokenizer
from vlp.interop.pretrained import InitReport, init_model
from vlp.loading import LOAD_ERRORS
from vlp.models import build_model, get_model_config
from vlp.models.families import config_to_dict
from vlp.objectives import ObjectiveError, get_objective

from . import checkpoint as ckpt
from . import faults
from .accumulate import exact_accumulation_step
from .ema import WeightEMA
from .engine import (
    DistInfo,
    barrier,
    build_engine,
    check_deepspeed_overrides,
    full_state_dict,
    init_distributed,
)
from .evals import EvalScheduler
from .guard import Preempted, StepSignals, signal_numbers
from .locking import LockError, apply_locks
from .logger import MetricsLogger
from .nonfinite import NonFiniteGuard, Rewind, batch_keys
from .watchdog import Watchdog


class TrainError(ValueError):
    """A run that cannot start as configured; the message names the input and the problem."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_total_steps(cfg: DictConfig, world_size: int, shards: str) -> int:
    if cfg.train.steps > 0:
        return int(cfg.train.steps)
    n = cfg.data.train_num_samples or selected_total(source_specs(cfg.data))
    if not n:
        raise TrainError(
            f"cannot turn train.epochs={cfg.train.epochs} into steps: the number of samples in "
            f"'{shards}' is unknown; set train.steps or data.train_num_samples"
        )
    per_step = cfg.data.batch_size * world_size * cfg.train.gradient_accumulation_steps
    return max(1, math.floor(cfg.train.epochs * n / per_step))


def _sum_over_ranks(n: int, device: torch.device) -> int:
    t = torch.tensor([n], dtype=torch.int64, device=device)  # NCCL reduces GPU tensors only
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return int(t.item())


class _StepState:
    """What `fit` carries between micro-batches: the log window, exact accumulation's pending inputs,
    the micro-batch count and the evals' results."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self.micro = 0
        self.pending: list[tuple[torch.Tensor, ...]] = []
        self.results: dict[str, Any] = {}
        self.preempt = False  # some rank was signalled: checkpoint and stop at the step's end
        self.save_due = False  # train.checkpoint_every_n_minutes elapsed on some rank
        self.loss_bad = False  # a micro-batch of the step in progress had a non-finite loss on this rank
        self.window: dict[str, Any] = {}
        self.reset_window()

    def reset_window(self) -> None:
        # n: micro-batches fetched; n_loss: those whose loss was finite (the logged loss averages these)
        self.window.update(loss=0.0, n=0, n_loss=0, t0=time.perf_counter(), wait=0.0, steps=0, terms={})


class Trainer:
    def __init__(self, cfg: DictConfig, resume: str | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        # -- cheap checks first: nothing below starts workers or allocates the optimizer
        self.model_cfg = self._check_run()
        self.source_prefix = self._source_prefixes()
        # the checks above read only the config: a refused run never joins (or creates) a process group
        self.dist: DistInfo = init_distributed(float(cfg.train.collective_timeout_minutes))
        self.total_steps = resolve_total_steps(cfg, self.dist.world_size,
                                               "::".join(src.shards for src in source_specs(cfg.data)))
        self.resume_notes: list[str] = []  # corrupt checkpoints passed over
        self.resume_dir = ckpt.resolve_resume(resume, self.run_dir, self.ckpt_root, self.resume_notes)
        if self.resume_dir is not None:
            ckpt.check_resume(self.resume_dir, cfg, self.model_cfg, self.dist.world_size)
        # -- build
        seed_everything(cfg.train.seed)  # same init on every rank
        self.model = build_model(self.model_cfg)
        self.init_report = self._init_from() if self.resume_dir is None else None
        self.tokenizer = get_tokenizer(self.model_cfg.text)
        self.module = self.objective.build(self.model, cfg, self.total_steps)
        self._prepare_model()
        self.engine = build_engine(self.module, cfg, self.total_steps, self.module.no_weight_decay())
        # under ZeRO-3 the EMA follows each rank's parameter partitions, which exist from here on
        self.ema = WeightEMA(self.model, cfg.ema, cfg.train.zero_stage == 3) if cfg.ema.enabled else None
        # DeepSpeed bf16/fp16 casts the module; images must follow (the loss itself runs in fp32)
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
        seed_everything(cfg.train.seed + 1000 * self.dist.rank)
        self.step, self.epoch, self.in_epoch = 0, 0, 0
        self.data_pos: DataPosition | None = None  # consumed samples of the current epoch
        self._pending: list[dict] = []  # micro-batches of the optimizer step in progress
        self.data_events: dict[str, int] = {}  # decode events of this rank in this epoch
        self.skipped_before = 0  # skipped samples of finished epochs, this rank
        self.signals: StepSignals | None = None  # preemption and save-due flags, while fit() runs
        self.watchdog: Watchdog | None = None  # while fit() runs
        note = self._restore() if self.resume_dir is not None else ""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            # what DeepSpeed was given: vlp's generated settings with train.deepspeed merged in
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(self.engine.config, indent=1, default=str))
        self.log = MetricsLogger(cfg, self.run_dir, self.total_steps, self.step, self.dist.is_main)
        self.evals = EvalScheduler(cfg.evals, self.tokenizer, self.model_cfg.preprocess, self.dist.device,
                                   cfg.train.seed, self.log)
        for line in self.resume_notes:
            self.log.write(f"warning: {line}")
        if self.resume_dir is not None:
            self.log.write(f"resumed from {self.resume_dir} at step {self.step}")
            if cfg.model.init_from.path:
                self.log.write(f"model.init_from ignored: the weights are the checkpoint's ({self.resume_dir})")
            if note:
                self.log.write(f"warning: {note}")
        elif self.init_report is not None:
            self.log.write(self.init_report.summary())
            if self.dist.is_main:
                (self.run_dir / "init_report.json").write_text(json.dumps(self.init_report.to_dict(), indent=1))

    def _check_run(self) -> Any:
        """Config-only checks of what the run needs (model, objective, shards); the resolved model config."""
        cfg = self.cfg
        try:
            model_cfg = get_model_config(cfg.model.name, **to_container(cfg)["model"]["overrides"])
        except ValueError as e:
            raise TrainError(f"model: {e}") from None
        self.objective = get_objective(cfg.loss.name)
        try:
            self.objective.check_model(model_cfg, cfg)
        except ObjectiveError as e:
            raise TrainError(str(e)) from None
        if not cfg.data.train_shards and not cfg.data.sources:
            raise TrainError("data.train_shards is empty: give a shard list, e.g. data.train_shards='shards/train-{000000..000009}.tar'")
        for src in source_specs(cfg.data):
            expand_shards(src.shards)  # raises DataError naming a missing path
        if cfg.train.deepspeed and (why := check_deepspeed_overrides(cfg)):
            raise TrainError(why)
        try:
            signal_numbers(list(cfg.train.preempt_signals))
            nf = cfg.train.nonfinite
            self.nonfinite = NonFiniteGuard(str(nf.policy), int(nf.max_in_a_row), cfg.train.precision == "fp16")
            self.faults = faults.from_env()
        except ValueError as e:
            raise TrainError(str(e)) from None
        if cfg.train.watchdog_minutes < 0 or cfg.train.collective_timeout_minutes <= 0:
            raise TrainError(f"train.watchdog_minutes must be >= 0 (0: off) and train.collective_timeout_minutes "
                             f"> 0, got {cfg.train.watchdog_minutes} and {cfg.train.collective_timeout_minutes}")
        return model_cfg

    def _init_from(self) -> InitReport | None:
        """Start the freshly built model from `model.init_from` (before locking, the objective's own
        copies and DeepSpeed's partitioning see it)."""
        init = self.cfg.model.init_from
        if not init.path:
            return None
        try:
            return init_model(self.model, init.path, init.format, list(init.parts), init.ema, init.strict)
        except LOAD_ERRORS as e:  # InitError / LoadError name the source; a converter's ValueError too
            raise TrainError(f"model.init_from: {e}" if not str(e).startswith("model.init_from") else str(e)) from None

    def _restore(self) -> str:
        """Weights, optimizer, EMA and data position from `resume_dir`; a warning to log, or ''."""
        note = ""
        self.step = ckpt.load_checkpoint(self.engine, self.resume_dir)
        if self.ema is not None and not self.ema.load(self.resume_dir):
            note = "checkpoint holds no EMA: the EMA starts from the resumed weights"
        meta = ckpt.read_meta(self.resume_dir)
        self.epoch, self.in_epoch = meta["epoch"], meta["batches_in_epoch"]
        self.nonfinite.load(meta.get("nonfinite"))
        why = "checkpoint has no data position"
        try:
            self.data_pos = ckpt.load_data_position(self.resume_dir, self.epoch)
        except LegacyPositionError as e:
            self.data_pos, why = None, f"checkpoint '{self.resume_dir}': {e}"
        if self.data_pos is None and self.in_epoch:
            self.in_epoch = 0  # a checkpoint without a data position: the epoch restarts
            note = f"{why}: epoch {self.epoch} restarts from its beginning"
        elif meta["world_size"] != self.dist.world_size:
            note = (f"checkpoint was written by {meta['world_size']} ranks, resuming on {self.dist.world_size}: "
                    f"the {self._remaining()} samples left in epoch {self.epoch} are divided among the new ranks")
        return note

    def _source_prefixes(self) -> dict[str, int] | None:
        """Prefix conditioning: source name -> index of its prefix kind (None: the model has none)."""
        kinds = tuple(self.model_cfg.text.prefix_kinds)
        out: dict[str, int] = {}
        for i, src in enumerate(source_specs(self.cfg.data)):
            key = f"data.sources[{i}].prefix" if self.cfg.data.sources else "data.train_shards"
            prefix = src.prefix or src.kind
            if not kinds:
                if src.prefix:
                    raise TrainError(f"{key}='{src.prefix}' but model '{self.cfg.model.name}' has no prefix "
                                     "conditioning (set model.overrides.text.prefix_kinds)")
                continue
            if prefix not in kinds:
                raise TrainError(f"{key}: the samples of source '{src.name}' take prefix '{prefix}', which is not "
                                 f"among model text.prefix_kinds {list(kinds)}")
            out[src.name] = kinds.index(prefix)
        return out if kinds else None

    def _prepare_model(self) -> None:
        """Locking, gradient checkpointing and compilation: before DeepSpeed sees the model."""
        cfg = self.cfg
        try:
            self.module.locked = apply_locks(self.model, cfg.lock)
        except LockError as e:
            raise TrainError(str(e)) from None
        self.module.train()
        if not any(p.requires_grad for p in self.model.parameters()):
            raise TrainError("lock: every parameter is locked, nothing to train")
        if cfg.train.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if cfg.train.compile:
            known = torch._dynamo.list_backends(exclude_tags=())
            if cfg.train.compile_backend not in known:
                raise TrainError(f"train.compile_backend: unknown backend '{cfg.train.compile_backend}' "
                                 f"(known: {', '.join(known)})")
            self.model.compile(backend=cfg.train.compile_backend)  # in place: state-dict keys unchanged

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.data_events = {}  # decode events of this rank in this epoch
        state = _StepState(cfg.data.batch_size * self.dist.world_size * cfg.train.gradient_accumulation_steps)
        stop_at = self.total_steps
        if cfg.train.stop_after_steps > 0:
            stop_at = min(self.total_steps, self.step + cfg.train.stop_after_steps)
        self.signals = StepSignals(list(cfg.train.preempt_signals), cfg.train.checkpoint_every_n_minutes,
                                   self.dist.device)
        self.watchdog = Watchdog(cfg.train.watchdog_minutes, self.dist.rank, self.run_dir)
        try:
            return self._fit_epochs(state, stop_at)
        finally:
            self.signals.close()
            self.watchdog.close()
            self.watchdog = None

    def _beat(self, stage: str, waits_on_peers: bool = False) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(stage, self.step + 1, waits_on_peers)

    def _paused(self):
        return self.watchdog.paused() if self.watchdog is not None else contextlib.nullcontext()

    def _fit_epochs(self, state: _StepState, stop_at: int) -> dict[str, Any]:
        loader = None  # built once; each pass is the next epoch, on the same (persistent) loader workers
        while self.step < stop_at:
            if loader is None:
                loader = self._loader()
            try:
                if not self._train_epoch(loader, state, stop_at):
                    break  # the step budget ended inside the epoch
            except Rewind:
                loader = None  # its workers end; the next one reads from the checkpoint's position
                with self._paused():
                    self._rewind(state)
                continue
            self._end_epoch(self._skipped_now())
            self.data_events.clear()
            self.epoch, self.in_epoch, self.data_pos = self.epoch + 1, 0, None
        del loader  # its workers end with it
        return self._finish(state.results)

    def _loader(self) -> Any:
        cfg = self.cfg
        build = lambda: build_train_loader(  # noqa: E731
            cfg.data, tokenizer=self.tokenizer, preprocess=self.model_cfg.preprocess, rank=self.dist.rank,
            world_size=self.dist.world_size, epoch=self.epoch, seed=cfg.train.seed, position=self.data_pos,
            exclude=frozenset(self.nonfinite.excluded))
        try:
            return build()
        except LegacyPositionError as e:  # an old bit-map position whose consumed samples are no prefix
            self.log.write(f"warning: checkpoint '{self.resume_dir}': {e}: epoch {self.epoch} restarts from its beginning")
            self.data_pos, self.in_epoch = None, 0
            return build()

    def _train_epoch(self, loader: Any, state: _StepState, stop_at: int) -> bool:
        """Train on the loader's next pass until the step budget or the epoch ends; True if the epoch did."""
        it = iter(loader)
        if loader.epoch != self.epoch:
            raise TrainError(f"data loader is at epoch {loader.epoch}, the trainer at {self.epoch}")
        self.data_pos = loader.position
        self._pending = []
        fresh_epoch, got_any = self.in_epoch == 0, False
        while self.step < stop_at:
            t_wait = time.perf_counter()
            self._beat("data wait")
            batch = next(it, None)
            while batch is not None and is_report_only(batch):
                self._absorb(batch)
                batch = next(it, None)
            if self.faults.sleep and state.micro % self.cfg.train.gradient_accumulation_steps == 0:
                self.faults.maybe_sleep(self.dist.rank, self.step + 1)  # a stalled data read, as on a dead mount
            self._beat("collective (the step's flags all-reduce)", waits_on_peers=self.dist.world_size > 1)
            more, preempt, due = self.signals.sync(batch is not None)
            state.preempt |= preempt
            state.save_due |= due
            if not more:
                break
            got_any = True
            state.window["wait"] += time.perf_counter() - t_wait
            out = self._micro_step(batch, state)
            if out is not None:
                self._after_step(out, state)
        else:
            return False
        del it
        if fresh_epoch and not got_any:
            raise TrainError(f"epoch {self.epoch} produced no batch on some rank: '{self.cfg.data.train_shards}' "
                             f"has too few samples for batch_size={self.cfg.data.batch_size} x {self.dist.world_size} ranks")
        return True

    def _micro_step(self, batch: dict[str, Any], state: _StepState) -> dict[str, torch.Tensor] | None:
        """Forward/backward of one micro-batch; the step's output once its last micro-batch is in."""
        d, gas = self.dist, self.cfg.train.gradient_accumulation_steps
        self._absorb(batch)
        if self.faults.nan_keys:
            self.faults.poison(batch)
        self._beat("forward/backward and optimizer step (with their collectives)")
        inputs = (batch["image"].to(d.device, self.input_dtype, non_blocking=True),
                  batch["text"].to(d.device, non_blocking=True))
        if self.source_prefix is not None:  # each sample's prefix kind, from its source
            inputs += (torch.tensor([self.source_prefix[s] for s in batch["source"]],
                                    dtype=torch.long, device=d.device),)
        self.in_epoch += 1
        state.micro += 1
        if self.cfg.train.contrastive_accumulation == "exact":  # GradCache: one loss over the step's micro-batches
            state.pending.append(inputs)
            if state.micro % gas:
                return None
            out = exact_accumulation_step(self.engine, self.module.loss, state.pending)
            state.pending.clear()
        else:
            out = self.engine(*inputs)
            self.engine.backward(out["loss"])
            self.engine.step()
        w = state.window
        w["n"] += 1
        loss = float(out["loss"].detach())
        if not math.isfinite(loss):  # the step will not be applied (see _after_step): kept out of the log
            state.loss_bad = True
            return None if state.micro % gas else out
        w["loss"] += loss
        w["n_loss"] += 1
        for k, v in out.items():  # the loss's terms (e.g. loss/stream0, loss/ibot), this rank's
            if k.startswith("loss/"):
                w["terms"][k] = w["terms"].get(k, 0.0) + float(v)
        return None if state.micro % gas else out

    def _after_step(self, out: dict[str, torch.Tensor], state: _StepState) -> None:
        """Bookkeeping after optimizer step: teacher/EMA, consumed samples, logging, checkpoint, evals."""
        cfg = self.cfg
        if self.engine.was_step_applied():
            self.nonfinite.applied()
        else:
            self._not_applied(state)
        state.loss_bad = False
        self.step += 1
        self.module.after_step(self.step)
        if self.ema is not None:
            self.ema.update(self.step)
        state.window["steps"] += 1
        self._commit_consumed()
        self.log.advance()
        if self.step % cfg.train.log_every_n_steps == 0 or self.step == self.total_steps:
            self._log_window(state.window, state.global_batch, float(out["logit_scale"]),
                             self.skipped_before + self._skipped_now())
            state.reset_window()
        every = cfg.train.checkpoint_every_n_steps
        if (every and self.step % every == 0) or state.save_due or state.preempt:
            self.save()
        state.save_due = False
        if state.preempt:
            self._preempted()
        with self._paused():
            state.results.update(self._scheduled_evals(final=False))

    def _not_applied(self, state: _StepState) -> None:
        """A step DeepSpeed did not apply (non-finite gradient): log it, then skip, rewind or stop."""
        action, msg = self.nonfinite.on_skipped(self.step + 1, batch_keys(self._pending), state.loss_bad,
                                                ckpt.find_latest(self.ckpt_root) is not None)
        if msg:
            self.log.write(f"warning: {msg} (all keys: {self.run_dir / 'nonfinite.jsonl'})")
            self.log.log(self.step + 1, {"nonfinite_steps": self.nonfinite.skipped})
            if self.dist.is_main:
                with open(self.run_dir / "nonfinite.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step + 1, "action": action,
                                        "keys": [f"{s}/{k}" for s, k in self.nonfinite.last_keys]}) + "\n")
        if action == "rewind":
            raise Rewind(msg)

    def _rewind(self, state: _StepState) -> None:
        """Back to the newest verified checkpoint (weights, optimizer, EMA, data position); the samples
        of the failed step stay excluded (`self.nonfinite.excluded`) from here on."""
        failed = self.step + 1
        self.resume_dir = ckpt.resolve_resume("latest", self.run_dir, self.ckpt_root, self.resume_notes)
        note = self._restore()
        state.pending.clear()
        state.loss_bad = False
        state.reset_window()
        self._pending = []
        self.log.rewound(self.step)
        self.log.write(f"rewound from step {failed} to {self.resume_dir} (step {self.step}); "
                       f"{len(self.nonfinite.excluded)} samples excluded from training"
                       + (f"; {note}" if note else ""))

    def _preempted(self) -> None:
        why = self.signals.requested or "a signal on another rank"
        msg = (f"preempted ({why}) at step {self.step} of {self.total_steps}: checkpoint "
               f"{self.ckpt_root / ckpt.tag_for(self.step)} written; exiting with code "
               f"{self.cfg.train.preempt_exit_code} (continue with --resume latest)")
        self.log.write(msg)
        self.log.close()
        barrier()  # exits together: torchrun restarts the group when the first worker exits
        raise Preempted(msg, int(self.cfg.train.preempt_exit_code))

    def _finish(self, results: dict[str, Any]) -> dict[str, Any]:
        """A last checkpoint if the last step has none; at the end of training the export and final evals."""
        latest = ckpt.find_latest(self.ckpt_root)
        if latest is None or ckpt.read_meta(latest)["step"] != self.step:
            self.save()
        if self.step < self.total_steps:
            self.log.write(f"stopped at step {self.step} of {self.total_steps}; continue with --resume latest")
            self.log.close()
            return results
        with self._paused():
            self.export()
            results.update(self._scheduled_evals(final=True))
        self.log.close()
        return results

    # ------------------------------------------------------------ data position
    def _remaining(self) -> int:
        return self.data_pos.num_units - self.data_pos.num_consumed if self.data_pos is not None else 0

    def _skipped_now(self) -> int:
        return sum(n for k, n in self.data_events.items() if k.startswith("skipped:"))

    def _absorb(self, batch: dict[str, Any]) -> None:
        """Count a batch's data events; its samples count as consumed at the next optimizer step."""
        for reason, n in batch["events"].items():
            self.data_events[reason] = self.data_events.get(reason, 0) + n
        self._pending.append(batch)

    def _commit_consumed(self) -> None:
        """The micro-batches of the optimizer step just taken are consumed: move their slots'
        cursors past them (and past the samples their workers dropped on the way)."""
        keys: list[str] = []
        for batch in self._pending:  # a slot's batches come in its read order: its cursor moves on
            self.data_pos.advance(int(batch["slot"]), batch["cursor"].numpy())
            keys.extend(batch["key"])
        self.data_pos.batches_since_split += sum(not is_report_only(b) for b in self._pending)
        self._pending = []
        if self.cfg.data.log_consumed_keys:
            out = self.run_dir / "consumed"
            out.mkdir(parents=True, exist_ok=True)
            with open(out / f"rank{self.dist.rank:05d}.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "epoch": self.epoch, "pid": os.getpid(), "keys": keys}) + "\n")

    def _gather_position(self) -> bytes | None:
        """Every rank's slot cursors (an int64 tensor of slots x streams, cursors only grow: a max
        all-reduce); the bytes to save (rank 0)."""
        if dist.is_initialized() and self.dist.world_size > 1:
            cursors = torch.from_numpy(self.data_pos.cursors.copy()).to(self.dist.device)
            dist.all_reduce(cursors, op=dist.ReduceOp.MAX)
            self.data_pos.merge(cursors.cpu().numpy())
        return self.data_pos.to_bytes() if self.dist.is_main else None

    def _end_epoch(self, skipped_here: int) -> None:
        """Report the samples this epoch dropped or converted, by reason (all ranks)."""
        reasons = sorted(self.data_events)
        if dist.is_initialized() and self.dist.world_size > 1:
            parts: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(parts, self.data_events)
            reasons = sorted({k for p in parts for k in p})
            totals = {k: sum(p.get(k, 0) for p in parts) for k in reasons}
        else:
            totals = dict(self.data_events)
        n = sum(v for k, v in totals.items() if k.startswith("skipped:"))
        self.skipped_before += skipped_here
        self.log.log(self.step, {"epoch_end": self.epoch, "skipped_samples_epoch": n,
                                 **{f"data/{k}": v for k, v in totals.items()}})
        if totals:
            self.log.write(f"epoch {self.epoch} data: " + ", ".join(f"{k}={totals[k]}" for k in reasons))
        if n:
            self.log.write(f"epoch {self.epoch}: skipped {n} samples that could not be decoded or had no "
                           f"image or caption (counts by reason above)")

    def _log_window(self, w: dict[str, Any], global_batch: int, logit_scale: float, skipped: int) -> None:
        d = self.dist
        stats = torch.tensor([w["loss"], w["n_loss"], skipped], dtype=torch.float64, device=d.device)
        if dist.is_initialized() and d.world_size > 1:
            dist.all_reduce(stats)
        elapsed = time.perf_counter() - w["t0"]
        metrics = {
            "loss": stats[0].item() / max(1.0, stats[1].item()),
            "lr": self.engine.get_lr()[0],
            "logit_scale": logit_scale,
            "samples_per_s": w["steps"] * global_batch / max(elapsed, 1e-9),
            "data_wait_frac": w["wait"] / max(elapsed, 1e-9),
            "data_wait_ms_per_step": 1000.0 * w["wait"] / max(w["n"], 1),  # per micro-batch fetched
            "epoch": self.epoch,
            "skipped_samples": int(stats[2].item()),
            **{k: v / max(w["n_loss"], 1) for k, v in w["terms"].items()},
        }
        self.log.log(self.step, metrics, show={
            "loss": f"{metrics['loss']:.3f}", "lr": f"{metrics['lr']:.2e}",
            "samples/s": f"{metrics['samples_per_s']:.0f}",
        })

    def _scheduled_evals(self, final: bool) -> dict[str, Any]:
        out = self.evals.run(self.step, self._eval_model, final)
        if out:
            self.module.train()
        return out

    def _eval_model(self, ema: bool) -> torch.nn.Module:
        return self._ema_model() if ema else self.engine.module.model

    def _ema_model(self) -> torch.nn.Module:
        """A plain fp32 copy of the model holding the EMA weights (collective under ZeRO-3)."""
        model = build_model(self.model_cfg)
        model.load_state_dict(self.ema.full_state_dict(), strict=True)
        return model.to(self.dist.device)

    # ------------------------------------------------------------- checkpoints
    def _meta(self) -> dict[str, Any]:
        return {
            "model_name": self.cfg.model.name,
            "model_config": config_to_dict(self.model_cfg),
            "run_config": to_container(self.cfg),
            "epoch": self.epoch,
            "batches_in_epoch": self.in_epoch,
            "world_size": self.dist.world_size,
            "nonfinite": self.nonfinite.state(),
            "selections": selection_fingerprints(source_specs(self.cfg.data)),
        }

    def save(self) -> Path:
        with self._paused():
            return self._save()

    def _save(self) -> Path:
        extra = {}
        if self.data_pos is not None:
            data = self._gather_position()
            if data is not None:
                extra[ckpt.DATA_POSITION] = data
        path = ckpt.save_checkpoint(self.engine, self.ckpt_root, self.step, self._meta(),
                                    self.cfg.train.keep_last_n_checkpoints,
                                    extra=self.ema.save if self.ema is not None else None, extra_files=extra)
        self.log.write(f"checkpoint: {path}")
        self.nonfinite.saved()
        if self.signals is not None:
            self.signals.saved()
        return path

    def export(self) -> None:
        """Consolidated fp32 weights of the model (not the task) beside its config, on rank 0."""
        if self.cfg.train.precision == "fp32":
            sd = full_state_dict(self.engine, self.engine.module.model)
        else:  # low-precision params: take the fp32 master weights from the last checkpoint
            barrier()
            sd = None
            if self.dist.is_main:
                from vlp.loading import load_state

                _, sd = load_state(ckpt.find_latest(self.ckpt_root))
        if self.dist.is_main:
            path = ckpt.export_weights(sd, self.model_cfg, self.cfg.model.name, self.run_dir)
            self.log.write(f"weights: {path}")
        if self.ema is not None:
            ema_sd = self.ema.full_state_dict()  # collective under ZeRO-3
            if self.dist.is_main:
                path = ckpt.export_weights(ema_sd, self.model_cfg, self.cfg.model.name, self.run_dir,
                                           filename="model_ema.safetensors")
                self.log.write(f"EMA weights: {path}")
        barrier()
