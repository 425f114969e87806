"""Progress never goes quiet: the heartbeat says what runs and for how long whenever a bar has not moved."""

from __future__ import annotations

import gc
import re
import threading
import time

from audit.core.progress import heartbeat, start_heartbeat


def test_a_silent_step_is_named_with_its_elapsed_time():
    lines: list[str] = []
    with heartbeat("score tuned", every_s=0.2, write=lines.append) as beat:
        beat.step("canary 3/12: ranking against 255 references")
        time.sleep(0.75)
    assert 2 <= len(lines) <= 4
    assert all(re.fullmatch(r"\[audit\] score tuned: canary 3/12: ranking against 255 references, \d+ s on it "
                            r"\(\d+ s in all\)", line) for line in lines), lines


def test_a_moving_bar_keeps_it_quiet_and_stop_ends_it():
    lines: list[str] = []
    beat = start_heartbeat("outputs", "sampling", every_s=0.3, write=lines.append)
    for _ in range(8):
        time.sleep(0.1)
        beat.touch()
    assert lines == []
    beat.stop()
    time.sleep(0.5)
    assert lines == []


def test_disabled_starts_no_thread():
    before = threading.active_count()
    with heartbeat("train", enabled=False, every_s=0.05) as beat:
        beat.step("x")
        assert threading.active_count() == before


def test_a_beat_whose_owner_is_gone_stops_by_itself():
    """An exception between start and stop drops the only strong reference: the thread must not talk forever."""
    lines: list[str] = []
    start_heartbeat("train", "building the trainer", every_s=0.1, write=lines.append)  # handle dropped at once
    gc.collect()
    time.sleep(0.4)
    assert lines == [] and not any(t.name == "heartbeat:train" for t in threading.enumerate())


def test_the_watchdog_speaks_only_after_the_run_started_and_only_in_silence():
    import sys

    from audit.core.progress import watchdog

    lines: list[str] = []
    with watchdog("run", every_s=0.2, write=lines.append, after="[audit]"):
        time.sleep(0.5)
        assert lines == []  # not armed: inputs are still being checked, a bad one must stay a single error line
        print("[audit] run directory runs/x", file=sys.stderr)
        for _ in range(6):  # a bar refreshing through stderr keeps it quiet
            time.sleep(0.1)
            sys.stderr.write("\rtrain:  50%")
        assert lines == []
        time.sleep(0.5)
    assert lines and re.fullmatch(r"\[audit\] run: still working \(\d+ s since the last line, \d+ s in all\); "
                                  r"last step: run directory runs/x", lines[0]), lines
    assert not hasattr(sys.stderr, "armed")  # stderr restored


def test_a_named_step_speaks_instead_of_the_watchdog():
    import sys

    from audit.core.progress import watchdog

    said: list[str] = []
    with watchdog("run", every_s=0.2, write=said.append), heartbeat("train", every_s=0.2, write=said.append) as beat:
        beat.step("building the trainer (162 texts)")
        print("[audit] x", file=sys.stderr)
        time.sleep(0.7)
    assert said and all(line.startswith("[audit] train: building the trainer (162 texts), ") for line in said), said
