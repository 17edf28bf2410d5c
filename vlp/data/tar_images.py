"""Evaluation images read from webdataset tar shards on access, not held decoded in memory.

An eval split in CLIP_benchmark's layout is indexed once by walking the tar headers (tarfile seeks
over member data): per sample its shard, the byte offset and size of its image member, and its
small text members (label, captions), which are read. `TarImages[i]` then reads and decodes one
image. A process holds 20 bytes per sample of index plus the images of the batches in flight, so
a 50,000-image split costs about 1 MB per rank instead of 50,000 decoded images; each rank (and
each loader worker, which gets a pickled copy: paths and arrays, no open files) decodes only the
samples it encodes.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vlp.data.position import member_key


class TarImages(Sequence):
    """The images of indexed tar shards as a sequence of PIL RGB images, decoded on access."""

    def __init__(self, shards: list[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray) -> None:
        self.shards = list(shards)
        self.shard, self.offset, self.size = shard, offset, size
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, i: int) -> Image.Image:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        s = int(self.shard[i])
        fd = self._fds.get(s)
        if fd is None:
            fd = self._fds[s] = os.open(self.shards[s], os.O_RDONLY)
        # pread: no file offset is moved, so forked loader workers may share an inherited descriptor
        data = os.pread(fd, int(self.size[i]), int(self.offset[i]))
        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB")
        except OSError as e:
            raise ValueError(f"{self.shards[s]}: the image at byte {int(self.offset[i])} cannot be decoded: {e}") from None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}  # a spawned loader worker opens its own files

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass


def index_tar_images(shards: list[Path], image_exts: Sequence[str], text_members: Sequence[str],
                     max_samples: int = 0) -> tuple[TarImages, list[dict[str, str]]]:
    """(the images, per sample its `text_members` as str) of the samples that have an image member
    (the first of `image_exts` present) and every text member, in shard order; at most
    `max_samples` (> 0). Samples without them are passed over, as the eager readers did."""
    shard_of, offsets, sizes, texts = [], [], [], []

    def flush(si: int, members: dict[str, tarfile.TarInfo], tar: tarfile.TarFile) -> None:
        ext = next((e for e in image_exts if e in members), None)
        if ext is None or any(t not in members for t in text_members):
            return
        fields = {}
        for t in text_members:
            fh = tar.extractfile(members[t])
            fields[t] = fh.read().decode() if fh is not None else ""
        shard_of.append(si)
        offsets.append(members[ext].offset_data)
        sizes.append(members[ext].size)
        texts.append(fields)

    for si, path in enumerate(shards):
        with tarfile.open(path, "r:") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile() or (kx := member_key(info.name)) is None:
                    continue
                kx = (kx[0], kx[1].lower())  # webdataset lowercases extensions (.JPG is jpg)
                if kx[0] != key:
                    if key is not None:
                        flush(si, members, tar)
                    key, members = kx[0], {}
                members[kx[1]] = info
                if 0 < max_samples <= len(texts):
                    break
            if key is not None and not 0 < max_samples <= len(texts):
                flush(si, members, tar)
        if 0 < max_samples <= len(texts):
            break
    n = len(texts) if max_samples <= 0 else min(len(texts), max_samples)
    images = TarImages([str(p) for p in shards], np.asarray(shard_of[:n], np.int32),
                       np.asarray(offsets[:n], np.int64), np.asarray(sizes[:n], np.int64))
    return images, texts[:n]
