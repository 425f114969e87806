"""Progress that never goes quiet: a line whenever nothing was said for 10 s, naming what runs.

Progress bars update once per unit (a canary, a batch of samples, a training step). When one unit takes a minute
(a canary ranked against 255 references on a loaded machine, a trainer being built, torch being imported), the
bar says nothing for that minute. Two pieces close the gaps:

* :func:`heartbeat` / :func:`start_heartbeat` name the step a long stage is in; a daemon thread prints it with
  its elapsed time when the terminal has been silent for ``every_s`` seconds::

      with heartbeat("score tuned", enabled=progress) as beat:
          for i, canary in enumerate(canaries):
              beat.step(f"canary {i + 1}/{len(canaries)}: ranking against 255 references")
              ...

      [audit] score tuned: canary 3/12: ranking against 255 references, 20 s on it (64 s in all)

* :func:`watchdog` (the CLI wraps ``audit run`` and ``audit chain`` in it) times every write to stderr, so it
  knows when a bar last moved, and says "still working" after ``every_s`` seconds of silence that no step names.

Silence is measured on one clock for the whole process (:func:`note_output`): any line, bar refresh or
heartbeat resets it, so two heartbeats never talk over each other. Lines go through ``tqdm.write`` so they never
tear an open bar. The threads only read strings and clocks, so they cannot change what the work computes.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HEARTBEAT_S = 10.0
"""Longest silence while work runs (issue 17: progress at least every ~10 s of work, with elapsed time)."""

_clock_lock = threading.Lock()
_last_output = time.monotonic()
_active: list[weakref.ref] = []


def note_output() -> None:
    """Something was just shown (a line, a bar refresh): the silence starts again."""
    global _last_output
    with _clock_lock:
        _last_output = time.monotonic()


def _claim_silence(every_s: float) -> float | None:
    """The silence if it reached ``every_s``, resetting the clock (so only one thread speaks); else None."""
    global _last_output
    with _clock_lock:
        now = time.monotonic()
        quiet = now - _last_output
        if quiet < every_s:
            return None
        _last_output = now
        return quiet


def _tqdm_write(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


class Beat:
    """The current step of a long stage; :meth:`step` names it, :meth:`touch` says its bar just moved."""

    def __init__(self, label: str, every_s: float, write) -> None:
        self.label = label
        self.every_s = every_s
        self._write = write
        self._what = ""
        self._started = self._step_started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.lines = 0

    def step(self, what: str) -> None:
        with self._lock:
            self._what = what
            self._step_started = time.monotonic()

    def touch(self) -> None:
        note_output()

    def stop(self) -> None:
        """No more lines (idempotent); a bar that takes over calls it."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def describe(self) -> str:
        with self._lock:
            now = time.monotonic()
            what = f"{self._what}, " if self._what else ""
            return f"{self.label}: {what}{now - self._step_started:.0f} s on it ({now - self._started:.0f} s in all)"

    def _maybe_say(self) -> None:
        if self.stopped or _claim_silence(self.every_s) is None:
            return
        self.lines += 1
        self._write(f"[audit] {self.describe()}")


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
        _active.append(weakref.ref(beat))
        threading.Thread(target=_beat_loop, args=(weakref.ref(beat), beat._stop, min(1.0, every_s / 4)),
                         name=f"heartbeat:{label}", daemon=True).start()
    else:
        beat.stop()
    return beat


@contextmanager
def heartbeat(label: str, *, enabled: bool = True, every_s: float = HEARTBEAT_S, write=None) -> Iterator[Beat]:
    """A :class:`Beat` for the block; with ``enabled`` a daemon thread names the step after each silent ``every_s``."""
    beat = start_heartbeat(label, enabled=enabled, every_s=every_s, write=write)
    try:
        yield beat
    finally:
        beat.stop()


def _running_beat() -> Beat | None:
    for ref in reversed(_active):
        beat = ref()
        if beat is not None and not beat.stopped:
            return beat
    _active[:] = [r for r in _active if (b := r()) is not None and not b.stopped]
    return None


class _TimedStream:
    """stderr, with every write noted on the silence clock (tqdm refreshes its bars through it)."""

    def __init__(self, stream: Any, *, arm_on: str | None = None) -> None:
        self._stream = stream
        self._arm_on = arm_on
        self.armed = threading.Event()
        if arm_on is None:
            self.armed.set()

    last_step = ""
    """The last ``[audit]`` line written (without the prefix), for "still working" to name."""

    def write(self, text: str) -> int:
        if text.strip():
            note_output()
            if text.startswith("[audit] ") and "still working" not in text:
                self.last_step = text.strip().removeprefix("[audit] ")
            if not self.armed.is_set() and self._arm_on is not None and self._arm_on in text:
                self.armed.set()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def watchdog(label: str, *, enabled: bool = True, every_s: float = HEARTBEAT_S, write=None,
             after: str | None = None) -> Iterator[None]:
    """Time stderr for the block; after ``every_s`` seconds of silence that no heartbeat names, say so.

    ``after``: stay silent until a line containing it went to stderr (the CLI arms it with the pipeline's first
    ``[audit]`` line, after every input was checked, so a bad input still gets exactly one line).
    """
    if not enabled:
        yield
        return
    original = sys.stderr
    timed = _TimedStream(original, arm_on=after)
    sys.stderr = timed
    started = time.monotonic()
    stop = threading.Event()
    say = write or _tqdm_write  # through the timed stderr, so open bars are cleared and redrawn around the line

    def loop() -> None:
        while not stop.wait(min(1.0, every_s / 4)):
            if not timed.armed.is_set() or _running_beat() is not None:
                continue  # not started yet, or the step's own heartbeat speaks, with its name
            quiet = _claim_silence(every_s)
            if quiet is not None:
                after = timed.last_step if len(timed.last_step) <= 70 else timed.last_step[:69] + "\u2026"
                say(f"[audit] {label}: still working ({quiet:.0f} s since the last line, "
                    f"{time.monotonic() - started:.0f} s in all)" + (f"; last step: {after}" if after else ""))

    note_output()
    thread = threading.Thread(target=loop, name=f"watchdog:{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2.0)
        if sys.stderr is not original and isinstance(sys.stderr, _TimedStream):
            sys.stderr = original
