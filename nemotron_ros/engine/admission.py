"""Admission control: can this request be answered by its deadline? Asked at the door, at
dispatch and, while it waits, by the watchdog.

Every figure comes from :class:`.RateEstimator`, which learns this model's overhead, prefill
and decode costs and the lengths its answers really have. Prompt sizes are exact: the number
of tokens the backend will evaluate after its reused prefix, or after the state the last
generation left when the request continues its conversation (a task's next step) and nothing
runs before it (``Backend.count_new_tokens``, counted again at dispatch).

* **At the door** a request's finish is estimated as the remaining time of the running
  generation (from the tokens it has streamed so far), plus the service time of every queued
  request that will run before it, plus its own service time. Answer lengths come from the
  recent answers: the ``answer_quantile`` for its own answer (which must fit), the upper
  quartile for the answers ahead of it (their sum matters, not each one).
  All these times are scaled by the median of how much slower than estimated recent
  generations were (:meth:`.RateEstimator.slowdown`, at least 1): when the machine slows
  down, the averages lag, and admission must not promise on stale rates.
  It is admitted when that finish, plus ``safety_margin_s``, comes before the time the backend
  is told to stop (:meth:`Admission.stop_at`). A newcomer that would push a queued request of
  its own priority past its deadline is refused too: a "yes" already given is kept.
* **At dispatch** the check is repeated with the time really left; a request that can no
  longer fit a typical answer is refused (``REJECTED_BUDGET``) instead of run to a certain
  ``BUDGET_EXCEEDED``, and ``max_tokens`` is lowered to what fits before the stop time.
* **While queued** the watchdog refuses a request as soon as the dispatch check would fail
  even if it started now (:meth:`Admission.hopeless_locked`).

The backend stops one decode step plus ``stop_lead_s`` before the deadline, so that an answer
cut by its budget comes back, with its usage and partial text, before the deadline passes.

Methods named ``*_locked`` run under the scheduler lock (they read the queue and the running
request); the others only read the estimator, which is thread-safe.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Optional, Union

from .estimator import Estimate, RateEstimator
from .tickets import RequestStatus, SchedulerConfig, SchedulerState, Ticket, ms
from .types import GenerationRequest, TokenCallback

#: The quantile of answer lengths planned for the requests that run before a newcomer.
_AHEAD_QUANTILE = 0.75

#: Why a request is refused: its status and the message that says so.
Refusal = tuple[RequestStatus, str]


class Admission:
    """Estimates and budget checks for one scheduler (see the module docstring)."""

    def __init__(self, config: SchedulerConfig, estimator: RateEstimator,
                 state: SchedulerState) -> None:
        self._config = config
        self._estimator = estimator
        self._state = state

    # ---------------------------------------------------------------- answer lengths

    def door_tokens(self, max_tokens: int) -> int:
        """The answer length a request is admitted with: a likely upper length."""
        likely = self._estimator.likely_tokens(max_tokens, self._config.answer_quantile)
        return max(1, min(max_tokens, max(self._config.min_new_tokens, likely)))

    def dispatch_tokens(self, max_tokens: int) -> int:
        """The answer length that must still fit when a request starts: a typical length."""
        typical = math.ceil(self._estimator.expected_tokens(max_tokens))
        return max(1, min(max_tokens, max(self._config.min_new_tokens, typical)))

    # ---------------------------------------------------------------- times

    def stop_lead_s(self) -> float:
        """How long before its deadline the backend is told to stop."""
        return self._estimator.decode_step_s() + self._config.stop_lead_s

    def stop_at(self, ticket: Ticket) -> float:
        """When the backend is told to stop ``ticket``'s generation."""
        return ticket.deadline - self.stop_lead_s()

    def running_stop_at(self, ticket: Ticket) -> float:
        """When the running ``ticket`` must be told to stop, given its own decode steps.

        A generation whose steps are slower than the learned rate (a slow ``on_token``
        consumer) is stopped earlier, so its cut answer still arrives by the deadline.
        """
        step = max(self._estimator.decode_step_s(), ticket.progress.max_gap_s)
        return ticket.deadline - step - self._config.stop_lead_s

    def _service(self, ticket: Ticket, tokens: float) -> float:
        return self._estimator.estimate(ticket.prompt_tokens, tokens).service_s

    def _ahead_service(self, ticket: Ticket) -> float:
        """How long a request that runs before a newcomer is planned to hold the model."""
        tokens = self._estimator.likely_tokens(ticket.max_tokens, _AHEAD_QUANTILE)
        return self._service(ticket, tokens)

    def _door_service(self, ticket: Ticket) -> float:
        """A request's own service time as admission plans it: likely length, likely speed."""
        return self._service(ticket, self.door_tokens(ticket.max_tokens)) * \
            self._estimator.slowdown(0.5)

    def _dispatch_service(self, ticket: Ticket) -> float:
        return self._service(ticket, self.dispatch_tokens(ticket.max_tokens))

    def remaining_locked(self, now: float) -> float:
        """Expected time until the running generation ends (0 when none runs)."""
        current = self._state.running()
        if current is None or current.started is None:
            return 0.0
        rates = self._estimator.rates()
        produced = current.progress.tokens
        limit = current.run_max_tokens or current.max_tokens
        if produced == 0:
            prefill = self._estimator.estimate(current.prompt_tokens, 1).service_s
            first = max(0.0, current.started + prefill - now)
            tokens = self._estimator.likely_tokens(limit, _AHEAD_QUANTILE)
            rest = max(0, tokens - 1) * rates.decode_s_per_token
        else:
            first = 0.0
            rest = self._estimator.remaining_tokens(produced, limit, _AHEAD_QUANTILE) * \
                rates.decode_s_per_token
        return max(0.0, min(first + rest, current.deadline - now))

    # ---------------------------------------------------------------- the door

    def admit_locked(self, ticket: Ticket, now: float, preempts: bool) -> Optional[str]:
        """None when ``ticket`` can be admitted; otherwise why it is refused (REJECTED_BUDGET).

        Leaves the admission estimate on ``ticket.estimate`` either way.
        """
        key = self._state.queue.key(ticket)
        slow = self._estimator.slowdown(0.5)
        start = now + (0.0 if preempts else self.remaining_locked(now) * slow)
        queued = self._state.queue.ordered()
        ahead = [t for t in queued if self._state.queue.key(t) < key]
        behind = [t for t in queued if self._state.queue.key(t) >= key]
        for other in ahead:
            start += min(self._ahead_service(other) * slow, max(0.0, other.deadline - start))
        tokens = self.door_tokens(ticket.max_tokens)
        ticket.estimate = _scaled(self._estimator.estimate(ticket.prompt_tokens, tokens,
                                                           start - now),
                                  self._door_service(ticket))
        finish = now + ticket.estimate.total_s + self._config.safety_margin_s
        if finish > self.stop_at(ticket):
            return (f'cannot answer within {ms(ticket.deadline - ticket.arrival)}'
                    f' ({ms(ticket.deadline - now)} left): {ticket.estimate.describe()}')
        shift = min(self._ahead_service(ticket) * slow, max(0.0, ticket.deadline - start))
        start += shift
        for other in behind:
            need = self._door_service(other) + self._config.safety_margin_s
            if (other.priority == ticket.priority and start - shift + need <= self.stop_at(other)
                    < start + need):
                return (f'answering it ({ms(shift)}) would make queued request {other.id!r}'
                        f' miss its deadline: {ticket.estimate.describe()}')
            start += min(self._ahead_service(other) * slow, max(0.0, other.deadline - start))
        return None

    # ---------------------------------------------------------------- dispatch

    def plan(self, ticket: Ticket, request: GenerationRequest
             ) -> Union[GenerationRequest, Refusal]:
        """The generation to run for ``ticket`` now, or why it must not run.

        Sets the deadline the backend works to, the scheduler's cancel token, ``max_tokens``
        lowered to what fits, and an ``on_token`` that also records the ticket's progress.
        """
        now = time.monotonic()
        waited = now - ticket.arrival
        if now >= ticket.deadline:
            return (RequestStatus.BUDGET_EXCEEDED,
                    f'deadline passed while queued (waited {ms(waited)})')
        stop_at = self.stop_at(ticket)
        if request.deadline is not None:
            stop_at = min(stop_at, request.deadline)
        left = stop_at - now - self._config.safety_margin_s
        cap = self._estimator.tokens_within(left, ticket.prompt_tokens)
        own = request.sampling.max_tokens
        needed = self.dispatch_tokens(own)
        if cap < needed:
            ticket.estimate = self._estimator.estimate(ticket.prompt_tokens, needed)
            return (RequestStatus.REJECTED_BUDGET,
                    f'only {ms(ticket.deadline - now)} left after waiting {ms(waited)}:'
                    f' {ticket.estimate.describe()}')
        ticket.run_max_tokens = min(own, cap)
        return replace(request, deadline=stop_at, cancel=ticket.token,
                       on_token=_tracking(ticket, request.on_token),
                       sampling=replace(request.sampling, max_tokens=ticket.run_max_tokens))

    def estimate(self, ticket: Ticket, tokens: int) -> Estimate:
        return self._estimator.estimate(ticket.prompt_tokens, tokens)

    # ---------------------------------------------------------------- while queued

    def hopeless_locked(self, ticket: Ticket, now: float) -> bool:
        """True when ``ticket`` would be refused at dispatch even if it started now."""
        return now >= self.latest_start(ticket)

    def latest_start(self, ticket: Ticket) -> float:
        """The last moment ``ticket`` can start and still fit a typical answer."""
        return (self.stop_at(ticket) - self._dispatch_service(ticket)
                - self._config.safety_margin_s)


def _scaled(estimate: Estimate, service_s: float) -> Estimate:
    """``estimate`` with its service parts scaled to add up to ``service_s``."""
    factor = service_s / estimate.service_s if estimate.service_s > 0 else 1.0
    return replace(estimate, overhead_s=estimate.overhead_s * factor,
                   prefill_s=estimate.prefill_s * factor, decode_s=estimate.decode_s * factor)


def _tracking(ticket: Ticket, on_token: Optional[TokenCallback]) -> TokenCallback:
    """An ``on_token`` that records progress on the ticket, then calls the caller's."""
    progress = ticket.progress

    def track(piece: str) -> None:
        progress.add(piece)
        if on_token is not None:
            on_token(piece)

    return track
