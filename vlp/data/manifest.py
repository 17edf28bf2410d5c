"""Shard specs and manifests: expand "a-{000..009}.tar::b.json" into shard URLs, read sample counts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import braceexpand


class DataError(ValueError):
    """Bad data input (shard spec, manifest); the message names the offending path or spec."""


def _manifest_path(spec: str) -> Path | None:
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        return p
    if p.is_dir():
        if (p / "train.json").is_file():
            return p / "train.json"
        raise DataError(f"shard directory '{spec}' has no train.json manifest")
    return None


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read shard manifest '{path}': {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataError(f"shard manifest '{path}' has no 'shards' list")
    return manifest


def _manifest_entries(path: Path) -> list[tuple[str, int | None]]:
    """(shard path, samples) from a manifest; a shard missing at its recorded path is looked up
    beside it so a directory of shards can be moved as a whole."""
    out = []
    for shard in _read_manifest(path)["shards"]:
        url = str(shard["url"])
        if not url.startswith("pipe:") and not Path(url).exists() and (path.parent / Path(url).name).exists():
            url = str(path.parent / Path(url).name)
        n = shard.get("num_samples")
        out.append((url, int(n) if n is not None else None))
    return out


def expand_shards_with_sizes(spec: str) -> list[tuple[str, int | None]]:
    """(url, samples or None) for each shard of "a-{000..009}.tar::b.tar", a manifest .json, or
    a dir holding train.json; sizes come from manifests. `pipe:` URLs pass unchecked; local
    paths must exist."""
    if not spec or not spec.strip():
        raise DataError(f"empty shard spec '{spec}'")
    entries: list[tuple[str, int | None]] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        manifest = _manifest_path(part)
        if manifest is not None:
            entries.extend(_manifest_entries(manifest))
        else:  # pipe: commands too: 'pipe:aws s3 cp s3://b/{000..999}.tar -' is one command per shard
            entries.extend((u, None) for u in braceexpand.braceexpand(part))
    for url, _ in entries:
        if not url.startswith("pipe:") and not Path(url).is_file():
            raise DataError(f"shard '{url}' does not exist (from spec '{spec}')")
    if not entries:
        raise DataError(f"shard spec '{spec}' expands to no shards")
    return entries


def expand_shards(spec: str) -> list[str]:
    """Shard URLs from "a-{000..009}.tar::b.tar", a manifest .json, or a dir holding train.json."""
    return [u for u, _ in expand_shards_with_sizes(spec)]


def num_samples_from_manifest(spec: str) -> int | None:
    """Total samples if every part of `spec` is a manifest (or dir with one); else None."""
    total = 0
    for part in spec.split("::"):
        try:
            path = _manifest_path(part.strip())
        except DataError:
            return None
        if path is None:
            return None
        manifest = _read_manifest(path)
        if "num_samples" in manifest:
            total += int(manifest["num_samples"])
        else:
            total += sum(int(s["num_samples"]) for s in manifest["shards"])
    return total


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from arbitrary parts, identical across processes (unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
