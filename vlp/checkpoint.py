"""Checkpoint integrity: a size and SHA-256 of every file, recorded in meta.json at save and
checked on resume, and the `python -m vlp.checkpoint verify RUN` command.

A checkpoint directory (`checkpoints/step_N/`) holds DeepSpeed's model and optimizer files,
per-rank RNG states, the EMA and the data position; `meta.json` is written last and lists
every other file as `{"files": {relative path: {"bytes": n, "sha256": hex}}}`. A file that is
missing, shorter or longer than recorded (a full disk, an interrupted copy) or whose bytes
differ (a bit flip) makes the checkpoint *corrupt*; the problem names the file.

Hashing is split across ranks at save and at resume (rank r hashes every world-th file), so
its cost per rank is the checkpoint's size divided by the number of ranks, at the speed of
SHA-256 (about 0.5–1.5 GB/s per core) — small beside writing the files. Checkpoints written
before checksums were recorded have no list: they are reported as unverified, and used.

    python -m vlp.checkpoint verify runs/demo            # every checkpoint of the run
    python -m vlp.checkpoint verify runs/demo/checkpoints/step_00000500
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vlp.loading import LATEST, META

CHUNK = 1 << 22


def checkpoint_files(ckpt_dir: Path) -> list[str]:
    """Relative paths of the files a checkpoint holds (all but meta.json and temporary files)."""
    ckpt_dir = Path(ckpt_dir)
    out = []
    for p in ckpt_dir.rglob("*"):
        rel = p.relative_to(ckpt_dir).as_posix()
        if p.is_file() and rel != META and ".tmp-" not in p.name:
            out.append(rel)
    return sorted(out)


def file_record(path: Path) -> dict[str, int | str]:
    """{"bytes", "sha256"} of one file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return {"bytes": n, "sha256": h.hexdigest()}


def records(ckpt_dir: Path, names: list[str], rank: int = 0, world: int = 1) -> dict[str, dict]:
    """Records of this rank's share of `names` (every world-th, from `rank`)."""
    return {name: file_record(Path(ckpt_dir) / name) for name in names[rank::world]}


def check_files(ckpt_dir: Path, files: dict[str, dict], rank: int = 0, world: int = 1) -> list[str]:
    """Problems of this rank's share of the recorded `files`, each naming the file."""
    ckpt_dir = Path(ckpt_dir)
    problems = []
    for name in sorted(files)[rank::world]:
        want, path = files[name], ckpt_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{path}: {size} bytes, {want['bytes']} recorded (truncated or incomplete)"
                            if size < want["bytes"] else f"{path}: {size} bytes, {want['bytes']} recorded")
            continue
        if file_record(path)["sha256"] != want["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the one recorded at save (corrupted bytes)")
    return problems


def read_meta_checked(ckpt_dir: Path) -> tuple[dict | None, str | None]:
    """(meta, None), or (None, problem) when meta.json is missing or unreadable."""
    path = Path(ckpt_dir) / META
    if not path.is_file():
        return None, f"{path}: missing (the checkpoint was never completed)"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path}: unreadable ({e})"
    if not isinstance(meta, dict):
        return None, f"{path}: not a JSON object"
    return meta, None


@dataclass
class Verdict:
    """What verification found in one checkpoint directory."""

    path: Path
    problems: list[str] = field(default_factory=list)
    checked: bool = True  # False: written before checksums were recorded
    num_files: int = 0
    num_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.problems:
            return f"CORRUPT     {self.path}\n" + "\n".join(f"    {p}" for p in self.problems)
        if not self.checked:
            return f"UNVERIFIED  {self.path} (written before checksums were recorded)"
        return f"OK          {self.path} ({self.num_files} files, {self.num_bytes / 1e6:.1f} MB)"


def verify(ckpt_dir: Path, rank: int = 0, world: int = 1) -> Verdict:
    """Verify one checkpoint (this rank's share of its files; every file when world == 1)."""
    meta, problem = read_meta_checked(ckpt_dir)
    if meta is None:
        return Verdict(Path(ckpt_dir), [problem])
    files = meta.get("files")
    if files is None:
        return Verdict(Path(ckpt_dir), checked=False)
    return Verdict(Path(ckpt_dir), check_files(ckpt_dir, files, rank, world), num_files=len(files),
                   num_bytes=sum(int(r["bytes"]) for r in files.values()))


def candidates(root: Path) -> list[Path]:
    """The step_* directories under a checkpoints root, the `latest` pointer's target first, then
    newest to oldest."""
    root = Path(root)
    dirs = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if target in dirs:
            dirs.remove(target)
            dirs.insert(0, target)
    return dirs


def _checkpoint_dirs(target: Path) -> list[Path]:
    if (target / META).is_file() or target.name.startswith("step_"):
        return [target]
    root = target / "checkpoints" if (target / "checkpoints").is_dir() else target
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp.checkpoint",
                                     description="Check the checkpoints of a vlp run against the sizes and "
                                                 "SHA-256 sums recorded when they were written.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="verify every checkpoint of a run (or one checkpoint directory)")
    v.add_argument("path", help="a run directory, its checkpoints/ directory, or one checkpoints/step_* directory")
    args = parser.parse_args(argv)
    target = Path(args.path)
    if not target.exists():
        print(f"error: '{target}' does not exist", file=sys.stderr)
        return 2
    dirs = _checkpoint_dirs(target)
    if not dirs:
        print(f"error: '{target}' holds no checkpoints (no step_* directories)", file=sys.stderr)
        return 2
    verdicts = [verify(d) for d in dirs]
    for verdict in verdicts:
        print(verdict.line())
    bad = sum(not v.ok for v in verdicts)
    usable = next((v.path for v in verdicts if v.ok), None)
    print(f"{len(verdicts)} checkpoints, {bad} corrupt; --resume latest would use "
          f"{usable if usable is not None else 'none (and refuse to start)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
