"""A latency-budgeted scheduler in front of one backend: every request answered exactly once.

Planners ask "answer within N ms or tell me now". This module turns that into a contract the
ROS layer only has to translate into messages:

* **One generation at a time.** A single worker thread feeds the backend from a bounded
  priority queue. A second, light *watchdog* thread (:mod:`.watchdog`) answers requests whose
  deadline arrives while they wait or while the backend overruns, so an answer never depends
  on the backend returning.
* **Admission control** (:mod:`.admission`). ``submit`` estimates the wait for the running
  and queued requests, at the lengths their answers typically have, plus this request's own
  prefill (the exact number of tokens the backend will evaluate) and an answer as long as most
  recent ones, from rates measured on this model (:mod:`.estimator`), and answers
  ``REJECTED_BUDGET`` at once, with the estimate, when the deadline cannot be met. The check is
  repeated at dispatch and, for queued requests, continuously by the watchdog.
* **Budget-aware length.** At dispatch ``max_tokens`` becomes the smaller of the request's own
  limit and what the measured decode rate allows before the deadline. The backend is told to
  stop one decode step (plus ``stop_lead_s``) before the deadline, so an answer cut by the
  budget comes back in time with its usage and partial text. Such an answer (or one finished
  after the deadline) is ``BUDGET_EXCEEDED``, never ``OK``, and the backend never returns a cut
  tool call.
* **Exactly once.** Each request owns a ticket whose outcome is set once under the scheduler
  lock; whoever sets it first (submitter, worker, watchdog, ``cancel``, ``shutdown``) delivers
  it, outside the lock, to the future and the callback. Everyone else finds it set.

Answers with tool calls:

* A call the model wrote that was not passed on (refused by validation, or cut by
  ``max_tokens`` or the deadline) is reported in ``status_message`` (``dropped 1 tool call:
  call_0: navigate_to: ...``) and counted in :attr:`SchedulerStats.dropped_tool_calls`.
* Under ``tool_choice`` ``REQUIRED`` an answer without a valid call is not ``OK``: it is
  ``INVALID_OUTPUT``, and ``status_message`` says what was dropped. (An answer cut by the
  budget stays ``BUDGET_EXCEEDED``: the budget, not the model, is why it has no call.)

Policies (documented choices):

* Queue order: higher ``priority`` first; within a priority, earliest deadline first
  (:attr:`QueuePolicy.PRIORITY_EDF`, default) or arrival order (``PRIORITY_FIFO``).
* Full queue: a newcomer of strictly higher priority evicts the last-ranked queued request
  (answered ``REJECTED_BUSY``); otherwise the newcomer is ``REJECTED_BUSY``. A stop command at
  high priority is never refused because of low-priority chatter.
* A newcomer that would make an admitted request of its own priority miss its deadline is
  ``REJECTED_BUDGET``: a "yes" already given is kept. Higher priority may displace lower.
* Preemption: a newly admitted request whose kind is in ``preempting_kinds`` (service and
  action by default) and whose priority is strictly higher than the running request's, when
  that one's kind is in ``preemptible_kinds`` (topic commands by default), cancels it; the
  interrupted request is answered ``PREEMPTED`` at once.
* Cancel and deactivate answer at once too (``CANCELED`` / ``INACTIVE``); the backend is told
  through the request's :class:`CancelToken` and the late result is discarded.
* Shutdown and ``set_active(False)`` answer every queued and running request ``INACTIVE``
  with the reason given (e.g. "shutting down"): the callers did not cancel, the node stopped.

Outcome callbacks run on whichever thread decided the outcome (the submitter's for immediate
rejections): keep them short and non-blocking. They may call back into the scheduler.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Optional

from .admission import Admission
from .backends import Backend, RequestError
from .estimator import Estimate, EstimatorConfig, RateEstimator, Rates
from .outcomes import classify, count_dropped
from .tickets import (
    UNBOUNDED_TOKENS,
    GenerationFactory,
    Outcome,
    OutcomeCallback,
    QueuePolicy,
    RequestHandle,
    RequestKind,
    RequestStatus,
    ScheduledRequest,
    SchedulerConfig,
    SchedulerState,
    SchedulerStats,
    Ticket,
    is_number,
    ms,
)
from .types import (
    CancelToken,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Message,
    SamplingParams,
)
from .watchdog import Watchdog

__all__ = [
    'Estimate', 'EstimatorConfig', 'GenerationFactory', 'Outcome', 'OutcomeCallback',
    'QueuePolicy', 'Rates', 'RequestHandle', 'RequestKind', 'RequestStatus',
    'ScheduledRequest', 'Scheduler', 'SchedulerConfig', 'SchedulerStats',
]

_LOG = logging.getLogger(__name__)


class Scheduler:
    """Runs requests one at a time on one backend, each answered exactly once by its deadline.

    Usage: build it over a loaded backend, optionally ``warm_up()``, then ``submit`` from any
    thread; ``shutdown()`` when done (also a context manager).
    """

    def __init__(self, backend: Backend, config: Optional[SchedulerConfig] = None, *,
                 start: bool = True) -> None:
        self._backend = backend
        self._config = config or SchedulerConfig()
        self._estimator = RateEstimator(self._config.estimator)
        self._state = SchedulerState(QueuePolicy(self._config.queue_policy))
        self._admission = Admission(self._config, self._estimator, self._state)
        self._watchdog = Watchdog(self._config, self._state, self._admission,
                                  self._stop_locked, self._deliver)
        self._lock = self._state.lock
        self._backend_lock = threading.Lock()
        self._seq = itertools.count()
        self._typical_prompt_tokens = 0
        self._counts: Counter = Counter()
        self._submitted = 0
        self._dropped_calls = 0
        self._consecutive_errors = 0
        self._ttft = (0.0, 0.0)
        self._tps = (0.0, 0.0)
        self._threads: list[threading.Thread] = []
        if start:
            self.start()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the worker and watchdog threads (idempotent)."""
        with self._lock:
            if self._threads or self._state.closed:
                return
            self._threads = [
                threading.Thread(target=self._worker_loop, name='scheduler-worker', daemon=True),
                self._watchdog.thread(),
            ]
        for thread in self._threads:
            thread.start()

    def warm_up(self, rounds: int = 3, max_tokens: int = 8, timeout_s: float = 60.0,
                cancel: Optional[CancelToken] = None,
                template: Optional[GenerationRequest] = None) -> Rates:
        """Measure prefill and decode rates with a few tiny generations and seed the estimator.

        The first of several rounds is discarded (one-time costs such as caches); the others
        alternate long and short prompts, so the prefill fit can tell its fixed cost from its
        cost per token. Call it after ``Backend.load()`` and before serving; called while
        serving, it waits for the running generation and is not seen by admission control.

        :param cancel: stops the warm-up within a token (a shutdown during configure); the
            rates measured so far are returned.
        :param template: a request like those that will be served (system prompt, tools,
            tool choice): the rounds use its system turn, tools and grammar, so the decode
            rate is measured with the grammar it will run with. Without it, a short
            unconstrained chat is used.
        :raises Exception: whatever the backend raises; a model that cannot run a tiny
            generation is not fit to serve.
        """
        sentence = 'The robot reports its position and battery level.'
        token = cancel if cancel is not None else CancelToken()
        for index in range(max(1, rounds)):
            if token.cancelled:
                break
            filler = ' '.join([sentence] * (8 if index % 2 == 0 else 2))
            sampling = SamplingParams(max_tokens=max(1, max_tokens))
            if template is None:
                request = GenerationRequest(
                    messages=[Message('system', 'You are a robot assistant. Answer briefly.'),
                              Message('user', f'{filler} Say ready.')],
                    constrained=False, sampling=sampling)
            else:
                system, user = template.messages[0], template.messages[-1]
                request = replace(template, messages=[
                    system, Message('user', f'{filler} {user.content}')], sampling=sampling)
            request = replace(request, deadline=time.monotonic() + timeout_s, cancel=token,
                              on_token=None)
            result, wall_s = self._generate(request)
            if token.cancelled:
                break
            if index > 0 or rounds <= 1:
                self._observe(result, wall_s, complete=False)
        return self._estimator.rates()

    def set_active(self, active: bool, reason: Optional[str] = None) -> None:
        """Serve (True) or answer every queued, running and new request ``INACTIVE`` (False).

        :param reason: the ``status_message`` of those answers (default: not active).
        """
        done: list[Ticket] = []
        with self._lock:
            state = self._state
            state.active = bool(active) and not state.closed
            if not state.active:
                if reason:
                    state.inactive_reason = reason
                self._stop_all_locked(RequestStatus.INACTIVE, state.inactive_reason, done)
            state.work.notify_all()
        self._deliver(done)

    @property
    def active(self) -> bool:
        return self._state.active

    def shutdown(self, timeout: float = 5.0, reason: str = 'scheduler shut down') -> bool:
        """Answer everything ``INACTIVE``, cancel the running generation and join the threads.

        :param reason: the ``status_message`` of those answers and of later requests.
        :returns: True when the threads ended within ``timeout``: no generation is running any
            more. False if the backend ignores its cancel token (the threads are daemons and
            do not block exit); the backend is then still in use and must not be unloaded.
        """
        done: list[Ticket] = []
        with self._lock:
            state = self._state
            state.closed = True
            state.active = False
            state.inactive_reason = reason
            self._stop_all_locked(RequestStatus.INACTIVE, reason, done)
            state.work.notify_all()
            state.timer.notify_all()
            threads = list(self._threads)
        self._deliver(done)
        end = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in threads if t is not threading.current_thread())

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # ----------------------------------------------------------------- requests

    def submit(self, request: ScheduledRequest,
               callback: Optional[OutcomeCallback] = None) -> RequestHandle:
        """Queue a request, or answer it at once when it cannot be served.

        Immediate answers are INACTIVE, INVALID_REQUEST, REJECTED_BUDGET and REJECTED_BUSY.
        Thread-safe; a malformed request is answered, not raised.

        :param callback: called once with the outcome, on the thread that decided it.
        :raises TypeError: when ``request`` is not a ScheduledRequest at all.
        """
        if not isinstance(request, ScheduledRequest):
            raise TypeError(f'expected a ScheduledRequest, got {type(request).__name__}')
        now = time.monotonic()
        ticket = Ticket.from_request(request, next(self._seq), now,
                                     self._config.default_budget_s, callback)
        handle = RequestHandle(ticket, self.cancel)
        problem = _validate(request)
        if problem is None:
            ticket.prompt_tokens, ticket.max_tokens = self._size(request)
        done: list[Ticket] = []
        with self._lock:
            self._submitted += 1
            if problem is not None:
                self._resolve_locked(ticket, RequestStatus.INVALID_REQUEST, problem, done)
            else:
                self._admit_locked(ticket, time.monotonic(), done)
        self._deliver(done)
        return handle

    def cancel(self, request_id: str) -> bool:
        """Answer a pending request ``CANCELED`` and stop its generation if running.

        :returns: False when no such request is pending (unknown or already answered).
        """
        done: list[Ticket] = []
        with self._lock:
            ticket = self._state.pending.get(request_id)
            if ticket is None:
                return False
            self._stop_locked(ticket, RequestStatus.CANCELED, 'canceled by the caller', done)
        self._deliver(done)
        return True

    def stats(self) -> SchedulerStats:
        """Queue depth, outcome counts, TTFT and decode speed, and the estimator's rates."""
        with self._lock:
            running = self._state.running()
            return SchedulerStats(
                active=self._state.active,
                queue_depth=len(self._state.queue),
                running=running.id if running is not None else None,
                submitted=self._submitted,
                answered=sum(self._counts.values()),
                counts={s.name: self._counts.get(s, 0) for s in RequestStatus},
                budget_misses=self._counts.get(RequestStatus.BUDGET_EXCEEDED, 0),
                consecutive_errors=self._consecutive_errors,
                last_ttft_s=self._ttft[0], avg_ttft_s=self._ttft[1],
                last_tokens_per_s=self._tps[0], avg_tokens_per_s=self._tps[1],
                rates=self._estimator.rates(), dropped_tool_calls=self._dropped_calls)

    def rates(self) -> Rates:
        """Return the estimator's current model of the backend."""
        return self._estimator.rates()

    def idle(self) -> bool:
        """Nothing runs or waits: a request submitted now runs next."""
        with self._lock:
            return self._state.current is None and not len(self._state.queue)

    # ----------------------------------------------------------------- the door

    def _size(self, request: ScheduledRequest) -> tuple[int, int]:
        """Prompt tokens to evaluate and requested max_tokens, as known at submit time."""
        payload = request.payload
        if isinstance(payload, GenerationRequest):
            return self._count_prompt(payload, self.idle()), payload.sampling.max_tokens
        max_tokens = request.max_tokens if request.max_tokens else UNBOUNDED_TOKENS
        if request.prompt_tokens is not None:
            return request.prompt_tokens, max_tokens
        return self._typical_prompt_tokens, max_tokens

    def _admit_locked(self, ticket: Ticket, now: float, done: list[Ticket]) -> None:
        state = self._state
        if state.closed or not state.active:
            self._resolve_locked(ticket, RequestStatus.INACTIVE, state.inactive_reason, done)
            return
        if ticket.id in state.pending:
            self._resolve_locked(ticket, RequestStatus.INVALID_REQUEST,
                                 f'request id {ticket.id!r} is already pending', done)
            return
        preempts = self._can_preempt_locked(ticket)
        refusal = self._admission.admit_locked(ticket, now, preempts)
        if refusal is not None:
            self._resolve_locked(ticket, RequestStatus.REJECTED_BUDGET, refusal, done)
            return
        if not self._make_room_locked(ticket, done):
            return
        state.queue.push(ticket)
        state.pending[ticket.id] = ticket
        if preempts:
            current = state.current
            self._stop_locked(current, RequestStatus.PREEMPTED,
                              f'preempted by request {ticket.id!r} (priority {ticket.priority}'
                              f' > {current.priority})', done)
        state.work.notify()
        state.timer.notify()

    def _make_room_locked(self, ticket: Ticket, done: list[Ticket]) -> bool:
        queue = self._state.queue
        if len(queue) < self._config.max_queue:
            return True
        last = queue.last()
        if (self._config.evict_lower_priority and last is not None
                and last.priority < ticket.priority):
            queue.remove(last)
            self._resolve_locked(last, RequestStatus.REJECTED_BUSY,
                                 f'evicted from the full queue by higher-priority request'
                                 f' {ticket.id!r}', done)
            return True
        self._resolve_locked(ticket, RequestStatus.REJECTED_BUSY,
                             f'queue full ({len(queue)} requests waiting)', done)
        return False

    def _can_preempt_locked(self, ticket: Ticket) -> bool:
        current = self._state.running()
        return (current is not None
                and ticket.kind in self._config.preempting_kinds
                and current.kind in self._config.preemptible_kinds
                and ticket.priority > current.priority)

    # ----------------------------------------------------------------- outcomes

    def _resolve_locked(self, ticket: Ticket, status: RequestStatus, message: str,
                        done: list[Ticket], result: Optional[GenerationResult] = None,
                        max_tokens: int = 0) -> bool:
        """Set the outcome once; the caller delivers ``done`` after releasing the lock."""
        if ticket.outcome is not None:
            return False
        now = time.monotonic()
        if status is RequestStatus.OK and now > ticket.deadline:
            status = RequestStatus.BUDGET_EXCEEDED
            message = f'answer came {ms(now - ticket.deadline)} after the deadline'
        ticket.outcome = Outcome(
            request_id=ticket.id, status=status, status_message=message, result=result,
            queue_s=max(0.0, (now if ticket.started is None else ticket.started)
                        - ticket.arrival),
            total_s=max(0.0, now - ticket.arrival), estimate=ticket.estimate,
            max_tokens=max_tokens or ticket.run_max_tokens)
        pending = self._state.pending
        if pending.get(ticket.id) is ticket:
            del pending[ticket.id]
        self._counts[status] += 1
        done.append(ticket)
        if status is not RequestStatus.OK:
            _LOG.debug('request %s: %s (%s)', ticket.id, status.name, message)
        return True

    def _finish(self, ticket: Ticket, status: RequestStatus, message: str,
                result: Optional[GenerationResult] = None, max_tokens: int = 0) -> None:
        done: list[Ticket] = []
        with self._lock:
            self._resolve_locked(ticket, status, message, done, result, max_tokens)
        self._deliver(done)

    def _stop_locked(self, ticket: Ticket, status: RequestStatus, message: str,
                     done: list[Ticket], result: Optional[GenerationResult] = None) -> None:
        """Answer a pending request now; a running one also gets its cancel token set."""
        if ticket is self._state.current:
            ticket.stopped_as = status
            reason = FinishReason.DEADLINE if status is RequestStatus.BUDGET_EXCEEDED \
                else FinishReason.CANCELLED
            ticket.token.cancel(reason)
        else:
            self._state.queue.remove(ticket)
        self._resolve_locked(ticket, status, message, done, result)

    def _stop_all_locked(self, status: RequestStatus, message: str,
                         done: list[Ticket]) -> None:
        for ticket in self._state.queue.drain():
            self._resolve_locked(ticket, status, message, done)
        running = self._state.running()
        if running is not None:
            self._stop_locked(running, status, message, done)

    @staticmethod
    def _deliver(done: list[Ticket]) -> None:
        for ticket in done:
            ticket.future.set_result(ticket.outcome)
            if ticket.callback is None:
                continue
            try:
                ticket.callback(ticket.outcome)
            except Exception:  # a caller's bug must not kill the scheduler
                _LOG.exception('outcome callback for request %s raised', ticket.id)

    # ----------------------------------------------------------------- worker

    def _worker_loop(self) -> None:
        state = self._state
        while True:
            with self._lock:
                while not state.closed and not (state.active and len(state.queue)):
                    state.work.wait()
                if state.closed:
                    return
                ticket = state.queue.pop()
                ticket.started = time.monotonic()
                state.current = ticket
                state.timer.notify()
            try:
                self._run(ticket)
            except Exception as exc:  # defensive: every request gets an answer
                _LOG.exception('scheduler failed on request %s', ticket.id)
                self._finish(ticket, RequestStatus.ERROR, f'scheduler error: {exc!r}')
            finally:
                with self._lock:
                    state.current = None
                    state.timer.notify()

    def _run(self, ticket: Ticket) -> None:
        request = self._build(ticket)
        if request is None:
            return
        # Counted again now that it runs: the world state may have changed since the door,
        # and what the last generation left may or may not be continued.
        ticket.prompt_tokens = self._count_prompt(request)
        if not isinstance(ticket.request.payload, GenerationRequest):
            ticket.max_tokens = request.sampling.max_tokens
        planned = self._admission.plan(ticket, request)
        if not isinstance(planned, GenerationRequest):
            status, message = planned
            self._finish(ticket, status, message)
            return
        with self._lock:
            if ticket.outcome is not None:
                return
        try:
            result, wall_s = self._generate(planned)
        except RequestError as exc:
            self._finish(ticket, RequestStatus.INVALID_REQUEST, str(exc))
            return
        except Exception as exc:  # a backend fault answers this request only
            self._count_error(True)
            _LOG.warning('backend failed on request %s: %r', ticket.id, exc)
            self._finish(ticket, RequestStatus.ERROR, f'backend error: {type(exc).__name__}:'
                         f' {exc}')
            return
        capped = planned.sampling.max_tokens < request.sampling.max_tokens
        self._observe(result, wall_s, complete=result.finish_reason is FinishReason.STOP)
        self._count_error(result.finish_reason is FinishReason.ERROR)
        status, message = classify(ticket, planned, result, capped)
        dropped = count_dropped(result.rejected)
        done: list[Ticket] = []
        with self._lock:
            if self._resolve_locked(ticket, status, message, done, result,
                                    planned.sampling.max_tokens):
                self._dropped_calls += dropped
        self._deliver(done)

    def _build(self, ticket: Ticket) -> Optional[GenerationRequest]:
        payload = ticket.request.payload
        if isinstance(payload, GenerationRequest):
            return payload
        try:
            request = payload()
        except ValueError as exc:
            self._finish(ticket, RequestStatus.INVALID_REQUEST, str(exc))
            return None
        except Exception as exc:  # the caller's factory failed: answer ERROR
            self._finish(ticket, RequestStatus.ERROR, f'request factory failed: {exc!r}')
            return None
        if not isinstance(request, GenerationRequest):
            self._finish(ticket, RequestStatus.INVALID_REQUEST,
                         f'request factory must return a GenerationRequest, got'
                         f' {type(request).__name__}')
            return None
        return request

    def _generate(self, request: GenerationRequest) -> tuple[GenerationResult, float]:
        with self._backend_lock:
            start = time.monotonic()
            result = self._backend.generate(request)
            return result, time.monotonic() - start

    def _observe(self, result: GenerationResult, wall_s: float, complete: bool) -> None:
        usage = result.usage
        self._estimator.observe(usage, wall_s, complete=complete)
        with self._lock:
            evaluated = usage.prompt_tokens - usage.prompt_tokens_reused
            if evaluated > 0:
                self._typical_prompt_tokens = evaluated
            alpha = self._config.estimator.alpha
            if usage.completion_tokens > 0 and usage.time_to_first_token_s > 0:
                self._ttft = _ema_pair(self._ttft, usage.time_to_first_token_s, alpha)
            if usage.tokens_per_second > 0:
                self._tps = _ema_pair(self._tps, usage.tokens_per_second, alpha)
            self._state.timer.notify()

    def _count_error(self, failed: bool) -> None:
        with self._lock:
            self._consecutive_errors = self._consecutive_errors + 1 if failed else 0

    def _count_prompt(self, request: GenerationRequest, runs_next: bool = True) -> int:
        """Tokens the backend will evaluate for ``request`` (after its reused prefix)."""
        try:
            return int(self._backend.count_new_tokens(request, runs_next))
        except Exception:  # a rough count is better than no admission control
            text = '\n'.join(m.content for m in request.messages)
            return len(text) // 4 + 1


def _validate(request: ScheduledRequest) -> Optional[str]:
    """Why a request is malformed, or None."""
    if not isinstance(request.id, str):
        return f'request id must be a string, got {type(request.id).__name__}'
    if not (is_number(request.budget_s) and request.budget_s >= 0):
        return f'budget_s must be a finite number >= 0, got {request.budget_s!r}'
    if isinstance(request.priority, bool) or not isinstance(request.priority, int):
        return f'priority must be an int, got {request.priority!r}'
    if not isinstance(request.kind, RequestKind):
        return f'kind must be a RequestKind, got {request.kind!r}'
    if request.arrival is not None and not is_number(request.arrival):
        return f'arrival must be a finite time.monotonic() value, got {request.arrival!r}'
    for name in ('prompt_tokens', 'max_tokens'):
        value = getattr(request, name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and value >= 0):
            return f'{name} must be an int >= 0, got {value!r}'
    if not (isinstance(request.payload, GenerationRequest) or callable(request.payload)):
        return ('payload must be a GenerationRequest or a factory returning one, got'
                f' {type(request.payload).__name__}')
    return None


def _ema_pair(pair: tuple[float, float], sample: float, alpha: float) -> tuple[float, float]:
    last, avg = pair
    return sample, sample if avg == 0.0 else avg + alpha * (sample - avg)
