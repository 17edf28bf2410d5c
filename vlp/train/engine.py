"""All process-group and DeepSpeed glue lives here.

`python train.py` alone is a one-process group (gloo on CPU); under torchrun the environment
variables torchrun sets are used as they are. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from vlp.models.clip import EMBEDDING_TABLE_FRAGMENTS

from .nonfinite import guard_fp32_step


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_elastic_group(backend: str, timeout) -> None:
    """Under torchrun, join the group through a store namespaced by the attempt (`attempt_generation`).

    After `--max-restarts` restarts a group, the agent's store still holds the previous
    attempt's peer addresses under the same keys, and gloo then connects to a dead rank
    ("Connection refused"). A prefix per attempt keeps each attempt's keys apart.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    gen = attempt_generation(store, rank, world, timeout.total_seconds())
    dist.init_process_group(backend, store=dist.PrefixStore(f"vlp/gen{gen}", store), rank=rank, world_size=world,
                            timeout=timeout)


def attempt_generation(store, rank: int, world: int, timeout_s: float, poll_s: float = 0.05) -> int:
    """A number all ranks of this attempt agree on and no earlier attempt used, from the store alone.

    `TORCHELASTIC_RESTART_COUNT` is not it: on several nodes each agent counts its own restarts,
    and one that restarts its workers because another node re-joined does not count, so two
    nodes of one attempt can disagree (measured: counts 0 and 1 in the same round), and ranks
    namespaced by it wait for each other forever. Here rank 0 opens a new generation (a counter
    in the store), waits until every other rank has joined it and then says go. Another rank
    joins the newest generation that is not complete yet (a complete one is an earlier
    attempt's). If no go comes within a few seconds, the generation belonged to a rank 0 that
    died, and the rank joins the next newest one.
    """
    if world == 1:
        return int(store.add("vlp/generation", 1))
    deadline = time.monotonic() + timeout_s
    if rank == 0:
        gen = int(store.add("vlp/generation", 1))
        joined = [f"vlp/gen{gen}/joined/{r}" for r in range(1, world)]
        while not store.check(joined):
            if time.monotonic() > deadline:
                raise RuntimeError(f"attempt generation {gen}: not every rank joined within {timeout_s:.0f} s")
            time.sleep(poll_s)
        store.set(f"vlp/gen{gen}/go", "1")
        return gen
    while time.monotonic() < deadline:
        gen = int(store.add("vlp/generation", 0))
        if gen == 0 or store.check([f"vlp/gen{gen}/go"]):  # none opened yet, or an earlier attempt's
            time.sleep(poll_s)
            continue
        store.set(f"vlp/gen{gen}/joined/{rank}", "1")
        wait_until = time.monotonic() + 5.0
        while time.monotonic() < wait_until:
            if store.check([f"vlp/gen{gen}/go"]):
                return gen
            if int(store.add("vlp/generation", 0)) != gen:
                break  # a newer generation opened: this one's rank 0 is gone
            time.sleep(poll_s)
    raise RuntimeError(f"rank {rank}: no attempt generation opened by rank 0 within {timeout_s:.0f} s")


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Join (or create) the process group, whose collectives time out after `timeout_minutes`; safe to call twice."""
    from datetime import timedelta

    timeout = timedelta(minutes=float(timeout_minutes))
    if "RANK" not in os.environ:  # plain `python train.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed

        if "TORCHELASTIC_RESTART_COUNT" in os.environ:
            _init_elastic_group(backend, timeout)
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def deepspeed_config(cfg: DictConfig) -> dict[str, Any]:
    t, o = cfg.train, cfg.optim
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        # our optimizer is torch's AdamW with param groups; DeepSpeed's ZeRO wraps it
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    user = t.get("deepspeed") or {}
    if user:
        ds = _merged(ds, to_plain(user))
    return ds


# DeepSpeed settings that vlp derives from its own keys: setting them in train.deepspeed is refused
# with the vlp key to use (two sources for one value would disagree silently)
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "data.batch_size x world size x train.gradient_accumulation_steps",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "bfloat16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "amp": "train.precision",
    "torch_autocast": "train.precision",
    "optimizer": "optim.* (vlp builds AdamW with its parameter groups)",
    "scheduler": "optim.warmup_steps / optim.min_lr_ratio (vlp's cosine schedule)",
}
# top-level sections DeepSpeed reads through `.keys()` tests, which the probe in
# known_deepspeed_keys cannot see
_SECTIONS_READ_ELSEWHERE = {"activation_checkpointing", "flops_profiler", "autotuning", "monitor_config"}


def to_plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, mappings key by key (a copy; neither input changes)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _offloads_optimizer(ds: dict[str, Any]) -> bool:
    off = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(off.get("device", "none")).lower() in ("cpu", "nvme")


def known_deepspeed_keys() -> set[str]:
    """The top-level keys this DeepSpeed version reads: recorded while it parses a minimal config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recording(dict):
        def get(self, k, *default):
            seen.add(k)
            return super().get(k, *default)

        def __getitem__(self, k):
            seen.add(k)
            return super().__getitem__(k)

        def __contains__(self, k):
            seen.add(k)
            return super().__contains__(k)

        def __copy__(self):
            return self

    DeepSpeedConfig(Recording(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    return {k for k in seen if isinstance(k, str)} | _SECTIONS_READ_ELSEWHERE | {"optimizer", "scheduler"}


def _without_user(cfg: DictConfig) -> DictConfig:
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["train"]["deepspeed"] = {}
    return OmegaConf.create(plain)


def _paths(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _paths(v, f"{prefix}{k}.")
    return out


def check_deepspeed_overrides(cfg: DictConfig) -> str | None:
    """None if `train.deepspeed` is usable, else why not (naming the key): keys vlp owns, keys this
    DeepSpeed does not know (with the nearest known one), and whatever DeepSpeed's own parsing of
    the merged config refuses (e.g. an unknown ZeRO field or a wrong type). Needs no process group."""
    import difflib

    user = to_plain(cfg.train.get("deepspeed") or {})
    if not isinstance(user, dict):
        return f"train.deepspeed must be a mapping of DeepSpeed config keys, got {type(user).__name__}"
    for path in _paths(user):
        if path in OWNED_DEEPSPEED_KEYS:
            return f"train.deepspeed.{path} is set by vlp from {OWNED_DEEPSPEED_KEYS[path]}; set that instead"
    generated = deepspeed_config(_without_user(cfg))
    for k, v in user.items():
        if isinstance(generated.get(k), dict) and not isinstance(v, dict):
            return f"train.deepspeed.{k} must be a mapping (vlp generates {k}: {generated[k]})"
    stage = int(cfg.train.zero_stage)
    zero = user.get("zero_optimization") or {}
    for what, least in (("offload_optimizer", 1), ("offload_param", 3)):
        device = str((zero.get(what) or {}).get("device", "none")).lower()
        need = 3 if device == "nvme" else least
        if device != "none" and stage < need:
            return (f"train.deepspeed.zero_optimization.{what}.device={device} needs train.zero_stage >= {need} "
                    f"(it is {stage})")
    known = known_deepspeed_keys()
    for k in user:
        if k not in known:
            near = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            return f"train.deepspeed.{k} is not a DeepSpeed config key{hint}"
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(deepspeed_config(cfg))
    except Exception as e:  # noqa: BLE001 - pydantic, assertion and value errors alike: one message
        lines = [ln.strip() for ln in str(e).strip().splitlines() if not ln.strip().startswith("For further")]
        return f"train.deepspeed: DeepSpeed refuses the merged config: {type(e).__name__}: " + "; ".join(lines[:6])
    return None


def decay_exempt(no_decay: set[str], decay_embeddings: bool) -> set[str]:
    """The model's exempt names, less its position / token embedding tables with `optim.decay_embeddings`
    (open_clip_train's grouping: only 1-d tensors, norms, biases and the logit scale are exempt)."""
    if not decay_embeddings:
        return set(no_decay)
    return {n for n in no_decay if not any(f in n for f in EMBEDDING_TABLE_FRAGMENTS)}


def param_groups(module: nn.Module, weight_decay: float, no_decay: set[str]) -> list[dict[str, Any]]:
    """AdamW groups: no decay on norms, biases, embeddings and the logit scale."""
    decay, plain = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (plain if name in no_decay or p.ndim < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from ~0 to 1, then cosine down to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_engine(task: nn.Module, cfg: DictConfig, total_steps: int, no_decay: set[str]):
    """deepspeed.initialize on the task module with our optimizer and schedule."""
    import deepspeed

    o = cfg.optim
    groups = param_groups(task, o.weight_decay, decay_exempt(no_decay, bool(o.decay_embeddings)))
    ds_config = deepspeed_config(cfg)
    if _offloads_optimizer(ds_config):
        # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised AdamW (the same update
        # as torch's AdamW, decoupled decay) instead of torch's, which DeepSpeed refuses there
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer: torch.optim.Optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                                            adamw_mode=True)
    else:
        # on a GPU torch's fused AdamW: one kernel per step for all parameters (same update)
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                      fused=torch.cuda.is_available())
    # DeepSpeed's ZeRO and bf16/fp16 optimizers skip a non-finite step themselves; torch's optimizer,
    # used as it is for fp32 without ZeRO, gets the same test (before the schedule wraps its step)
    plain = optimizer if int(cfg.train.zero_stage) == 0 and cfg.train.precision == "fp32" else None
    if plain is not None:
        guard_fp32_step(plain)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, o.warmup_steps, total_steps, o.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=task, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    if plain is not None and engine.optimizer is not plain:
        raise RuntimeError("DeepSpeed wrapped the optimizer of an fp32 run without ZeRO: the non-finite "
                           "step guard would not see its steps")
    return engine


def full_state_dict(engine, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """fp32 copy of `module`'s full weights on rank 0 (None elsewhere); all ranks must call.

    Under ZeRO-3 the partitions are gathered first. Meant for fp32 runs: with bf16/fp16 the module
    holds low-precision copies, and the trainer takes the fp32 masters from the checkpoint instead.
    """
    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    params = list(module.parameters()) if engine.zero_optimization_stage() == 3 else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        if rank != 0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
