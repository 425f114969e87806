"""Progress that never goes quiet: a heartbeat line while one long unit of work runs.

Progress bars update once per unit (a canary, a batch of samples, a training step). When one unit takes a minute
(a canary ranked against 255 references on a loaded machine, a trainer being built), the bar says nothing for
that minute. :func:`heartbeat` runs beside such work and, whenever nothing was said for ``every_s`` seconds,
prints what is running and for how long::

    with heartbeat("score tuned", enabled=progress) as beat:
        for i, canary in enumerate(canaries):
            beat.step(f"canary {i + 1}/{len(canaries)}: ranking against 255 references")
            ...

    [audit] score tuned: canary 3/12: ranking against 255 references, 20 s on it (64 s in all)

Lines go through ``tqdm.write`` so they never tear an open bar. The thread only reads a string and two clocks,
so it cannot change what the work computes.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

HEARTBEAT_S = 10.0
"""Longest silence while work runs: the issue-17 contract (progress at least every ~10 s of work)."""


class Beat:
    """The current step of a long stage; :meth:`step` names it, :meth:`touch` says the bar just moved."""

    def __init__(self, label: str, every_s: float, write) -> None:
        self.label = label
        self.every_s = every_s
        self._write = write
        self._what = ""
        self._started = self._step_started = self._said = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.lines = 0

    def step(self, what: str) -> None:
        with self._lock:
            self._what = what
            self._step_started = self._said = time.monotonic()

    def touch(self) -> None:
        with self._lock:
            self._said = time.monotonic()

    def stop(self) -> None:
        """No more lines (idempotent); a bar that takes over calls it."""
        self._stop.set()

    def _maybe_say(self) -> None:
        with self._lock:
            now = time.monotonic()
            if self._stop.is_set() or now - self._said < self.every_s:
                return
            what = f"{self._what}, " if self._what else ""
            line = (f"[audit] {self.label}: {what}{now - self._step_started:.0f} s on it "
                    f"({now - self._started:.0f} s in all)")
            self._said = now
            self.lines += 1
        self._write(line)


def _tqdm_write(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def _beat_loop(ref: weakref.ref, stop: threading.Event, tick_s: float) -> None:
    # Only a weak reference: if the code that started the beat is gone (an exception before stop()), so is the beat.
    while not stop.wait(tick_s):
        beat = ref()
        if beat is None:
            return
        beat._maybe_say()
        del beat


def start_heartbeat(label: str, what: str = "", *, enabled: bool = True, every_s: float = HEARTBEAT_S,
                    write=None) -> Beat:
    """A running :class:`Beat` (call ``stop()``); for code that cannot wrap its long part in :func:`heartbeat`."""
    beat = Beat(label, every_s, write or _tqdm_write)
    beat.step(what)
    if enabled:
        threading.Thread(target=_beat_loop, args=(weakref.ref(beat), beat._stop, min(1.0, every_s / 4)),
                         name=f"heartbeat:{label}", daemon=True).start()
    else:
        beat.stop()
    return beat


@contextmanager
def heartbeat(label: str, *, enabled: bool = True, every_s: float = HEARTBEAT_S, write=None) -> Iterator[Beat]:
    """A :class:`Beat` for the block; with ``enabled`` a daemon thread says what runs after each silent ``every_s``."""
    beat = start_heartbeat(label, enabled=enabled, every_s=every_s, write=write)
    try:
        yield beat
    finally:
        beat.stop()
