"""Shared machinery of the evaluators: rank split, exactly-once gathering, batched feature extraction.

Every rank encodes a contiguous slice of the samples and the slices are gathered in rank
order, so the full feature matrix equals a one-process run row for row. Each rank runs the
same number of forward passes (short ranks repeat a padding batch whose output is dropped)
because ZeRO-3 gathers weights collectively inside each forward.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vlp.data.transforms import eval_transform
from vlp.eval.tasks import EvalContext
from vlp.models.config import PreprocessConfig


class ImageSource(Protocol):
    def __len__(self) -> int: ...
    def image(self, i: int) -> Any: ...


_LOADED: dict[tuple[Any, ...], Any] = {}


def load_once(loader: Callable[..., Any], name: str, split: str, max_samples: int, *extra: Any) -> Any:
    """loader(name, split, max_samples, *extra), memoized per process: in-training evals load nothing twice."""
    key = (loader.__module__, loader.__qualname__, name, split, max_samples, *extra)
    if key not in _LOADED:
        _LOADED[key] = loader(name, split, max_samples, *extra)
    return _LOADED[key]


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_context(device: torch.device | str = "cpu", **kwargs: Any) -> EvalContext:
    """An EvalContext filled with this process's rank and world size."""
    rank, size = world()
    return EvalContext(device=device, rank=rank, world_size=size, **kwargs)


def shard(n: int, rank: int, world_size: int) -> tuple[range, int]:
    """(this rank's contiguous slice of range(n), the slice length of the largest rank)."""
    per_rank = -(-n // world_size) if n else 0
    return range(min(n, rank * per_rank), min(n, (rank + 1) * per_rank)), per_rank


def gather_rows(t: torch.Tensor, ctx: EvalContext) -> torch.Tensor:
    """Concatenate each rank's rows in rank order (CPU result on every rank)."""
    t = t.detach().cpu()
    if ctx.world_size == 1:
        return t
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, t)
    return torch.cat(parts)


class _Transformed(Dataset):
    def __init__(self, source: ImageSource, indices: Sequence[int], pre: PreprocessConfig) -> None:
        self.source, self.indices, self.transform = source, list(indices), eval_transform(pre)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.source.image(self.indices[i]))


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype  # bf16/fp16 under DeepSpeed mixed precision


def _native_uint8(source: ImageSource, pre: PreprocessConfig) -> np.ndarray | None:
    """The source's uint8 array [N, S, S] or [N, S, S, 3] when S == image_size (resize and crop are
    then identities), else None."""
    arr = getattr(source, "images", None)
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        return None
    if arr.shape[1] != pre.image_size or arr.shape[2] != pre.image_size or (arr.ndim == 4 and arr.shape[3] != 3):
        return None
    return arr


class _BatchedArray:
    """Batches of a native-size uint8 array normalized in one tensor op: the same values as the
    per-image PIL path (ToTensor = x / 255, Normalize = (x - mean) / std) without per-image work."""

    def __init__(self, arr: np.ndarray, indices: list[int], pre: PreprocessConfig, batch_size: int) -> None:
        self.arr, self.indices, self.batch_size = arr, indices, batch_size
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            x = torch.from_numpy(self.arr[self.indices[start:start + self.batch_size]])
            x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
            yield x.float().div(255).sub(self.mean).div(self.std)


def encode_images(model: torch.nn.Module, source: ImageSource, pre: PreprocessConfig, batch_size: int,
                  ctx: EvalContext, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Unit-norm fp32 image features [n, D] for `indices` (default: all of `source`), on every rank."""
    idx = list(range(len(source))) if indices is None else list(indices)
    mine, per_rank = shard(len(idx), ctx.rank, ctx.world_size)
    mine_idx = [idx[i] for i in mine]
    arr = _native_uint8(source, pre)
    if arr is not None:
        loader: Any = _BatchedArray(arr, mine_idx, pre, batch_size)
    else:
        loader = DataLoader(_Transformed(source, mine_idx, pre), batch_size=batch_size,
                            num_workers=ctx.workers, persistent_workers=False)
    dtype = _model_dtype(model)
    feats: list[torch.Tensor] = []
    with torch.inference_mode():
        for images in loader:
            feats.append(F.normalize(model.encode_image(images.to(ctx.device, dtype)).float(), dim=-1).cpu())
        pad = -(-per_rank // batch_size) - len(feats)
        if pad > 0:
            dummy = _Transformed(source, [idx[0]], pre)[0][None].to(ctx.device, dtype)
            for _ in range(pad):
                model.encode_image(dummy)
    local = torch.cat(feats) if feats else torch.zeros(0, _embed_dim(model))
    return gather_rows(local, ctx)


def text_prefix(model: torch.nn.Module, options: Mapping[str, Any] | str | None) -> str | None:
    """The prefix kind texts are encoded with (option `prefix`: the asked kind, or a mapping holding
    it under "prefix"): a prefix-conditioned model (Prefix Conditioning) defaults to "caption", the
    mode zero-shot transfer wants; a model without prefixes takes none, and asking it for one is an
    error naming the option."""
    kinds = tuple(getattr(getattr(model, "text", None), "prefix_kinds", ()) or ())
    asked = options.get("prefix") if isinstance(options, Mapping) else options
    if not kinds:
        if asked not in (None, ""):
            raise ValueError(f"option prefix={asked!r}: this model has no prefix conditioning")
        return None
    kind = str(asked) if asked not in (None, "") else "caption"
    if kind not in kinds:
        raise ValueError(f"option prefix={kind!r}: not a prefix kind of this model (known: {', '.join(kinds)})")
    return kind


def encode_text_kind(model: torch.nn.Module, tokens: torch.Tensor, kind: str | None) -> torch.Tensor:
    """model.encode_text, with the prefix kind only when there is one (other models keep their signature)."""
    return model.encode_text(tokens) if kind is None else model.encode_text(tokens, kinds=kind)


def encode_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int,
                 ctx: EvalContext, kind: str | None = None) -> torch.Tensor:
    """Unit-norm fp32 text features [len(texts), D], split across ranks, on every rank; `kind`:
    the prefix of a prefix-conditioned model (see text_prefix)."""
    mine, per_rank = shard(len(texts), ctx.rank, ctx.world_size)
    mine_texts = [texts[i] for i in mine]
    feats: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(mine_texts), batch_size):
            tokens = tokenizer(mine_texts[start:start + batch_size]).to(ctx.device)
            feats.append(F.normalize(encode_text_kind(model, tokens, kind).float(), dim=-1).cpu())
        for _ in range(-(-per_rank // batch_size) - len(feats)):
            encode_text_kind(model, tokenizer([texts[0]]).to(ctx.device), kind)
    local = torch.cat(feats) if feats else torch.zeros(0, _embed_dim(model))
    return gather_rows(local, ctx)


def _embed_dim(model: torch.nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "embed_dim", 0))


def fingerprint_model(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: the cache key of a checkpoint's weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def dataset_key(name: str, split: str, max_samples: int, reader: str = "labelled") -> str:
    """What identifies a dataset's images: the built-in name, or a local path plus the names,
    sizes and modification times of the files under it and the reader that selected its images
    (the labelled and the captioned readers of one directory may keep different samples)."""
    from pathlib import Path

    p = Path(name)
    parts = [name, split, str(max_samples)]
    if p.exists():
        parts.append(reader)
        files = sorted(f for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
        parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def cached(ctx: EvalContext, kind: str, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """compute(), stored as `{kind}_{hash(checkpoint fingerprint, key)}.pt` under ctx.cache_dir.

    Rank 0 alone decides and reads the cache and broadcasts, so ranks never disagree about
    whether to run collective forward passes (the cache need not be on a shared file system).
    Without a cache directory or checkpoint fingerprint this is just compute().
    """
    if ctx.cache_dir is None or ctx.checkpoint_id is None:
        return compute()
    digest = hashlib.sha256(json.dumps([ctx.checkpoint_id, key], default=str).encode()).hexdigest()[:20]
    path = ctx.cache_dir / f"{kind}_{digest}.pt"
    box: list[Any] = [torch.load(path, weights_only=True) if ctx.is_main and path.is_file() else None]
    if ctx.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        return box[0]
    value = compute()
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(value.detach().cpu(), tmp)
        os.replace(tmp, path)
    return value


def cached_image_features(model: torch.nn.Module, source: ImageSource, pre: PreprocessConfig, batch_size: int,
                          ctx: EvalContext, key: str) -> torch.Tensor:
    """encode_images, cached per (checkpoint fingerprint, dataset key from dataset_key, preprocessing)."""
    return cached(ctx, "image_features", [key, asdict(pre)],
                  lambda: encode_images(model, source, pre, batch_size, ctx))
