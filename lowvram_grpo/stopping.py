"""Stopping a run on request, and bounding calls that may never return.

Ctrl-C or SIGTERM (the app's Stop) asks the run to stop. Between phases the loop finishes its
step and saves a checkpoint; but one step can take minutes (long generation, a slow reward
function, a reward function stuck in a loop), so the two places that can take that long also
give up early: generation ends at the next token (`StopGeneration`) and a reward call is
abandoned (`call_with_deadline`). Both raise `StepInterrupted`; the trainer then drops the
unfinished step and checkpoints the last finished one, which is exact: neither phase touches
the weights or the optimizer.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from lowvram_grpo.processes import stop_signals

# How often a waiting main thread looks at the stop flag and the clock.
POLL_SECONDS = 0.05


class StepInterrupted(Exception):
    """A stop was requested in the middle of a step; the step is dropped, not finished."""


class CallTimedOut(Exception):
    """A bounded call did not return in time (it is abandoned, still running, in its thread)."""


class StopRequested:
    """SIGINT/SIGTERM set a flag that the loop and the long phases look at.

    `same_request_within`: signals this close to the first one are the same request (with
    several processes, Ctrl-C reaches a process both from the terminal and from the launcher).
    A later second signal quits at once (KeyboardInterrupt).
    """

    def __init__(self, same_request_within: float = 0.0, announce: bool = True):
        self.requested = False
        self.same_request_within = same_request_within
        self.announce = announce
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in stop_signals():
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook thread)
                pass
        return self

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame):
        if self.requested and time.monotonic() - self._first >= self.same_request_within:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out
        if not self.requested:
            self.requested, self._first = True, time.monotonic()
            if self.announce:
                # os.write, not print: a signal handler may interrupt a print in progress.
                os.write(2, b"\nstop requested: saving a checkpoint and stopping "
                            b"(press Ctrl-C again to quit at once, without one)\n")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def call_with_deadline(fn: Callable[[], Any], timeout: float | None,
                       should_stop: Callable[[], bool] | None = None) -> Any:
    """`fn()`, run in a daemon thread while this thread keeps watch.

    Returns its result or re-raises its exception. Raises `CallTimedOut` after `timeout`
    seconds (None: no limit) and `StepInterrupted` as soon as `should_stop()` is true. Python
    cannot kill a thread, so an abandoned call keeps running; being a daemon it never keeps the
    process alive, and the run is ending anyway.
    """
    if timeout is None and should_stop is None:
        return fn()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    worker = threading.Thread(target=run, name="lowvram-grpo-bounded-call", daemon=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    worker.start()
    while True:
        worker.join(POLL_SECONDS)
        if not worker.is_alive():
            break
        if should_stop is not None and should_stop():
            raise StepInterrupted()
        if deadline is not None and time.monotonic() >= deadline:
            raise CallTimedOut()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def generation_stopper(should_stop: Callable[[], bool]):
    """A transformers StoppingCriteria that ends every sequence once a stop is requested."""
    import torch
    from transformers import StoppingCriteria

    class StopGeneration(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.size(0),), should_stop(), dtype=torch.bool, device=input_ids.device)

    return StopGeneration()
