"""The watchdog: answers by their deadlines the requests nobody else will answer in time.

A light thread beside the scheduler's worker, so that an answer never depends on the backend
returning. It sleeps until the next moment something can change and then:

* answers ``BUDGET_EXCEEDED`` a queued request whose deadline has passed;
* answers ``REJECTED_BUDGET`` a queued request that can no longer fit a typical answer even
  if it started now (the dispatch check would refuse it): the caller hears "no" as soon as it
  is certain, not at its deadline;
* tells the running generation to stop one of its own decode steps (plus ``stop_lead_s``)
  before the deadline, so the backend's cut answer, with usage, arrives in time even when
  its steps are slower than the learned rate (a slow ``on_token`` consumer);
* answers ``BUDGET_EXCEEDED`` the running request when its deadline (plus
  ``deadline_grace_s``) passes before the backend returned, with what it has streamed so far,
  and cancels its generation.

The backend is told to stop a little earlier than the deadline (see :mod:`.admission`), so
normally the worker answers a cut generation first, with the backend's own usage; the
watchdog only fires when the backend overruns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Optional

from .admission import Admission
from .tickets import RequestStatus, SchedulerConfig, SchedulerState, Ticket, ms
from .types import FinishReason, GenerationResult

#: Answers a pending request (under the lock); the caller delivers ``done`` after it.
StopFn = Callable[[Ticket, RequestStatus, str, list, Optional[GenerationResult]], None]


class Watchdog:
    """Runs :meth:`loop` on its own thread; woken through ``state.timer``."""

    def __init__(self, config: SchedulerConfig, state: SchedulerState, admission: Admission,
                 stop: StopFn, deliver: Callable[[list[Ticket]], None]) -> None:
        self._config = config
        self._state = state
        self._admission = admission
        self._stop = stop
        self._deliver = deliver

    def thread(self) -> threading.Thread:
        return threading.Thread(target=self.loop, name='scheduler-watchdog', daemon=True)

    def loop(self) -> None:
        state = self._state
        while True:
            done: list[Ticket] = []
            with state.lock:
                if state.closed:
                    return
                now = time.monotonic()
                self.expire_locked(now, done)
                if not done:
                    state.timer.wait(self._next_wake_locked(now))
            self._deliver(done)

    def expire_locked(self, now: float, done: list[Ticket]) -> None:
        """Answer queued requests that can no longer make it, and a running overrun."""
        state = self._state
        for ticket in state.queue:
            waited = now - ticket.arrival
            if now >= ticket.deadline:
                self._stop(ticket, RequestStatus.BUDGET_EXCEEDED,
                           f'deadline passed while queued (waited {ms(waited)})', done, None)
            elif self._admission.hopeless_locked(ticket, now):
                self._stop(ticket, RequestStatus.REJECTED_BUDGET,
                           f'can no longer answer by the deadline after waiting {ms(waited)}'
                           f' ({ms(ticket.deadline - now)} left)', done, None)
        current = state.running()
        if current is None:
            return
        if not current.token.cancelled and now >= self._admission.running_stop_at(current):
            # Stop the generation a step early: the backend then answers (worker thread)
            # before the deadline with its usage and partial text.
            current.token.cancel(FinishReason.DEADLINE)
        if now >= current.deadline + self._config.deadline_grace_s:
            partial = current.partial_result()
            tokens = partial.usage.completion_tokens if partial is not None else 0
            self._stop(current, RequestStatus.BUDGET_EXCEEDED,
                       f'no answer by the deadline; generation stopped after {tokens} tokens',
                       done, partial)

    def _next_wake_locked(self, now: float) -> Optional[float]:
        state = self._state
        wakes = [self._admission.latest_start(t) for t in state.queue]
        current = state.running()
        if current is not None:
            if not current.token.cancelled:
                wakes.append(self._admission.running_stop_at(current))
            wakes.append(current.deadline + self._config.deadline_grace_s)
        if not wakes:
            return None
        return min(1.0, max(0.0005, min(wakes) - now))
