"""A per-rank watchdog: a step that does not finish in time ends the process, with a report.

A rank blocked in a collective whose peer died, or waiting for a data worker on a dead mount,
never fails by itself: the job burns its allocation until a person notices. Here the training
loop reports each stage it enters (data wait, forward/backward, collective, optimizer step)
with `beat`. A daemon thread checks the time since the last report. When it exceeds
`train.watchdog_minutes`, the thread writes which rank, stage and step stalled, and which
shards this rank's data workers were reading. It writes this to stderr and to
`run_dir/watchdog/rank{R}.txt`, then ends the process with `EXIT_CODE`. torchrun
(`--max-restarts`) then stops the group's other ranks and restarts it from the last checkpoint.

A rank that waits in a collective is, most often, the victim of a peer stalled elsewhere; the
report that helps is the stalled peer's. So a rank whose stage is a collective (`beat(...,
waits_on_peers=True)`) waits `COLLECTIVE_GRACE` of the timeout longer (at most 5 minutes more).
Without that, every rank fires within one poll of the others and torchrun may stop the stalled
rank before it has written its report.

Evaluation and checkpoint writes pause the watchdog (`paused()`): they are long by nature and
have no step to finish. The data workers report the shard they open by writing one small file
per worker under `run_dir/watchdog/` (vlp.data.position.note_shard). That is one write per
shard, not per sample.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from vlp.data.position import SHARD_NOTES_ENV

EXIT_CODE = 76
COLLECTIVE_GRACE = 0.5  # a rank waiting on its peers fires after timeout * (1 + this), at most 300 s later


class Watchdog:
    def __init__(self, minutes: float, rank: int, run_dir: Path) -> None:
        self.timeout = 60.0 * float(minutes)
        self.rank = rank
        self.dir = Path(run_dir) / "watchdog"
        self.stage, self.step, self.since = "start", 0, time.monotonic()
        self.waits_on_peers = False
        self._paused = 0
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.timeout > 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.environ[SHARD_NOTES_ENV] = str(self.dir)  # data workers forked from here on note their shards
            self._thread = threading.Thread(target=self._watch, name="vlp-watchdog", daemon=True)
            self._thread.start()

    def beat(self, stage: str, step: int, waits_on_peers: bool = False) -> None:
        """The loop entered `stage` of optimizer step `step` (counted from 1); `waits_on_peers`: a collective."""
        self.stage, self.step, self.since = stage, step, time.monotonic()
        self.waits_on_peers = waits_on_peers

    def limit(self) -> float:
        """Seconds without progress after which this rank fires, in its current stage."""
        if not self.waits_on_peers:
            return self.timeout
        return self.timeout + min(COLLECTIVE_GRACE * self.timeout, 300.0)

    @contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self.since = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        os.environ.pop(SHARD_NOTES_ENV, None)

    def _watch(self) -> None:
        every = min(max(self.timeout / 10, 0.2), 10.0)
        while not self._stop.wait(every):
            stalled = time.monotonic() - self.since
            if not self._paused and stalled > self.limit():
                self._fire(stalled)

    def shards(self) -> list[str]:
        """'url (opened N s ago, pid P)' of the shards this rank's data workers (or the rank itself) opened last."""
        out = []
        for path in sorted(self.dir.glob(f"rank{self.rank}-pid*.txt")):
            try:
                opened, url = path.read_text().split(" ", 1)
            except (OSError, ValueError):
                continue
            if float(opened) >= self._started:  # this attempt's workers only
                out.append(f"{url.strip()} (opened {time.time() - float(opened):.0f} s ago, "
                           f"{path.stem.split('-', 1)[1]})")
        return out

    def _fire(self, stalled: float) -> None:
        shards = self.shards()
        report = (f"watchdog: rank {self.rank} made no progress for {stalled:.0f} s "
                  f"(train.watchdog_minutes={self.timeout / 60:g}) in stage '{self.stage}' of step {self.step}; "
                  f"its data workers last opened: {'; '.join(shards) if shards else 'no shard yet'}. "
                  f"Exiting with code {EXIT_CODE} so that torchrun restarts the group from the last checkpoint.")
        try:
            (self.dir / f"rank{self.rank}.txt").write_text(report + "\n")
        except OSError:
            pass
        print(report, file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)  # the main thread is blocked (a collective, a worker): it cannot raise
