"""Ctrl-C (SIGINT) and SIGTERM during a run: stop at once, but never in the middle of a save.

``StopSignals`` turns the *first* SIGINT or SIGTERM into an ``Interrupted`` exception raised in the
main thread, wherever the run is (loading, encoding, a training step, rendering samples). Inside
``shielded()`` blocks (writing the delta, the resume state and the logs) it is held back and raised
when the block ends, so a save always completes. Every later signal is only acknowledged: the run
is already stopping, and raising again could cut the save that stopping performs. (``kill -9``
remains the way to abandon a save.) Inside ``held()`` a signal is only recorded, for code that must
decide together with other processes when to stop (the multi-process training loop). The exit
status for an interrupted run is ``128 + signal``: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run was stopped by ``signal_number`` (SIGINT or SIGTERM)."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number

    @classmethod
    def of(cls, stop: KeyboardInterrupt) -> Interrupted:
        """``stop`` itself, or for a plain ``KeyboardInterrupt`` the SIGINT it stands for."""
        return stop if isinstance(stop, Interrupted) else cls(signal.SIGINT)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signal_number


class StopSignals:
    """While entered (main thread only; elsewhere it does nothing), SIGINT and SIGTERM raise
    ``Interrupted`` once. Re-entrant: an inner ``with`` of an already active instance, or a new
    instance inside an active one, changes nothing. Previous handlers are restored on exit."""

    _active: StopSignals | None = None

    def __init__(self) -> None:
        self.received: int | None = None
        """The first signal received, if any."""
        self._shield_depth = 0
        self._hold_depth = 0
        self._pending = False
        self._previous: dict[int, object] = {}
        self._owner = False

    def __enter__(self) -> StopSignals:
        if StopSignals._active is not None or threading.current_thread() is not threading.main_thread():
            return StopSignals._active or self
        for number in HANDLED_SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        StopSignals._active = self
        self._owner = True
        return self

    def __exit__(self, *exc_info) -> None:
        if not self._owner:
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        StopSignals._active = None
        self._owner = False

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is not None:
            print(
                f"\n{signal.Signals(number).name} again: already stopping; the save in progress completes "
                "first (kill -9 abandons it)",
                file=sys.stderr,
                flush=True,
            )
            return
        self.received = number
        if self._hold_depth:
            return
        if self._shield_depth:
            self._pending = True
            return
        raise Interrupted(number)

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Hold a first signal that arrives inside this block until the block has finished."""
        self._shield_depth += 1
        try:
            yield
        finally:
            self._shield_depth -= 1
        if not self._shield_depth and self._pending:
            self._pending = False
            raise Interrupted(self.received)

    def stop(self, signal_number: int) -> Interrupted:
        """Record that this process stops for ``signal_number`` (e.g. one another process received),
        so any signal from now on is only acknowledged; returns the exception to raise."""
        if self.received is None:
            self.received = signal_number
        return Interrupted(signal_number)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Inside, a signal only sets ``received`` (nothing is raised, not even when the block ends):
        the code inside polls it and stops when it decides to."""
        self._hold_depth += 1
        try:
            yield
        finally:
            self._hold_depth -= 1


@contextmanager
def shielded() -> Iterator[None]:
    """``StopSignals.shielded()`` of the active instance; a plain block when none is active."""
    active = StopSignals._active
    if active is None:
        yield
        return
    with active.shielded():
        yield
