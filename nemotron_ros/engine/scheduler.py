"""A latency-budgeted scheduler in front of one backend: every request answered exactly once.

Planners ask "answer within N ms or tell me now". This module turns that into a contract the
ROS layer only has to translate into messages:

* **One generation at a time.** A single worker thread feeds the backend from a bounded
  priority queue. A second, light *watchdog* thread answers requests whose deadline arrives
  while they wait or while the backend overruns, so an answer never depends on the backend
  returning.
* **Admission control.** ``submit`` estimates queue wait + overhead + prefill + a minimal
  decode from rates measured on this model (:mod:`.estimator`) and answers
  ``REJECTED_BUDGET`` at once, with the estimate, when the deadline cannot be met. The check is
  repeated at dispatch and, for queued requests, continuously by the watchdog.
* **Budget-aware length.** At dispatch ``max_tokens`` becomes the smaller of the request's own
  limit and what the measured decode rate allows before the deadline; the backend also gets the
  deadline itself. An answer cut by the budget (or finished after the deadline) is
  ``BUDGET_EXCEEDED``, never ``OK``, and the backend never returns a cut tool call.
* **Exactly once.** Each request owns a ticket whose outcome is set once under the scheduler
  lock; whoever sets it first (submitter, worker, watchdog, ``cancel``, ``shutdown``) delivers
  it, outside the lock, to the future and the callback. Everyone else finds it set.

Policies (documented choices):

* Queue order: higher ``priority`` first; within a priority, earliest deadline first
  (:attr:`QueuePolicy.PRIORITY_EDF`, default) or arrival order (``PRIORITY_FIFO``).
* Full queue: a newcomer of strictly higher priority evicts the last-ranked queued request
  (answered ``REJECTED_BUSY``); otherwise the newcomer is ``REJECTED_BUSY``. A stop command at
  high priority is never refused because of low-priority chatter.
* Preemption: a newly admitted request whose kind is in ``preempting_kinds`` (service and
  action by default) and whose priority is strictly higher than the running request's, when
  that one's kind is in ``preemptible_kinds`` (topic commands by default), cancels it; the
  interrupted request is answered ``PREEMPTED`` at once.
* Cancel and deactivate answer at once too (``CANCELED`` / ``INACTIVE``); the backend is told
  through the request's :class:`CancelToken` and the late result is discarded.
* Shutdown and ``set_active(False)`` answer every queued and running request ``INACTIVE``:
  the callers did not cancel, the node stopped serving.

Outcome callbacks run on whichever thread decided the outcome (the submitter's for immediate
rejections): keep them short and non-blocking. They may call back into the scheduler.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Optional, Union

from .backend import Backend, RequestError
from .estimator import Estimate, EstimatorConfig, RateEstimator, Rates
from .types import (
    CancelToken,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Message,
    SamplingParams,
)

_LOG = logging.getLogger(__name__)

_UNBOUNDED_TOKENS = 2 ** 31 - 1


class RequestStatus(enum.IntEnum):
    """How a request ended; values mirror the ``STATUS_*`` constants of ``msg/Action``."""

    OK = 0
    REJECTED_BUDGET = 1
    BUDGET_EXCEEDED = 2
    REJECTED_BUSY = 3
    INVALID_REQUEST = 4
    INACTIVE = 5
    PREEMPTED = 6
    CANCELED = 7
    ERROR = 8


class RequestKind(str, enum.Enum):
    """Where a request came from; decides who may preempt whom."""

    SERVICE = 'service'
    ACTION = 'action'
    TOPIC = 'topic'


class QueuePolicy(str, enum.Enum):
    """Order of waiting requests. Priority always comes first."""

    PRIORITY_EDF = 'priority_edf'
    PRIORITY_FIFO = 'priority_fifo'


GenerationFactory = Callable[[], GenerationRequest]
OutcomeCallback = Callable[['Outcome'], None]


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduling policy and admission settings.

    :param default_budget_s: budget of a request whose ``budget_s`` is 0.
    :param max_queue: waiting requests held at most (the running one not counted).
    :param evict_lower_priority: when full, let a higher-priority newcomer evict the
        last-ranked waiting request instead of being refused.
    :param min_new_tokens: tokens a useful answer needs at least (a short tool call); a request
        is admitted only if this many fit before its deadline.
    :param safety_margin_s: slack kept between the estimated finish and the deadline.
    :param deadline_grace_s: how long after a running request's deadline the watchdog waits for
        the backend before answering ``BUDGET_EXCEEDED`` itself.
    """

    default_budget_s: float = 5.0
    max_queue: int = 16
    queue_policy: QueuePolicy = QueuePolicy.PRIORITY_EDF
    evict_lower_priority: bool = True
    preempting_kinds: frozenset[RequestKind] = frozenset({RequestKind.SERVICE, RequestKind.ACTION})
    preemptible_kinds: frozenset[RequestKind] = frozenset({RequestKind.TOPIC})
    min_new_tokens: int = 16
    safety_margin_s: float = 0.005
    deadline_grace_s: float = 0.0
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)

    def __post_init__(self) -> None:
        self._verify_args()

    def _verify_args(self) -> None:
        if not (math.isfinite(self.default_budget_s) and self.default_budget_s > 0):
            raise ValueError(
                f'default_budget_s must be a finite number > 0, got {self.default_budget_s}')
        if self.max_queue < 1:
            raise ValueError(f'max_queue must be >= 1, got {self.max_queue}')
        if self.min_new_tokens < 1:
            raise ValueError(f'min_new_tokens must be >= 1, got {self.min_new_tokens}')
        for name in ('safety_margin_s', 'deadline_grace_s'):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f'{name} must be a finite number >= 0, got {value}')
        try:
            QueuePolicy(self.queue_policy)
            for kind in (*self.preempting_kinds, *self.preemptible_kinds):
                RequestKind(kind)
        except ValueError as exc:
            raise ValueError(f'invalid scheduler policy: {exc}') from exc


@dataclass(frozen=True)
class ScheduledRequest:
    """What a caller asks the scheduler for: plain data, no scheduler state.

    The scheduler owns the generation's ``deadline`` (the earlier of the budget's and the
    payload's own), ``cancel`` token (cancel through :meth:`Scheduler.cancel`) and may lower
    ``sampling.max_tokens`` to what the budget allows; every other field is passed through.

    :param payload: the generation, or a factory called once on the worker thread right before
        generation starts (so a rendered world state is as fresh as possible). A factory may
        raise ``ValueError`` to reject the request as invalid.
    :param id: echoed in the outcome; generated when empty; unique among pending requests.
    :param budget_s: time allowed from ``arrival`` to the answer; 0 means the default budget.
    :param priority: higher runs first and may preempt (see :class:`SchedulerConfig`).
    :param kind: where the request came from.
    :param arrival: ``time.monotonic()`` when the request reached the node; now when None.
    :param prompt_tokens: prompt size hint for a factory payload (admission control).
    """

    payload: Union[GenerationRequest, GenerationFactory]
    id: str = ''
    budget_s: float = 0.0
    priority: int = 0
    kind: RequestKind = RequestKind.TOPIC
    arrival: Optional[float] = None
    prompt_tokens: Optional[int] = None


@dataclass(frozen=True)
class Outcome:
    """The one answer to one request.

    :param queue_s: arrival to start of generation (to the answer if it never started).
    :param total_s: arrival to the answer.
    :param estimate: the admission estimate (or the dispatch-time one, when rejected then).
    :param max_tokens: the token limit the generation ran with (0 when it did not run).
    """

    request_id: str
    status: RequestStatus
    status_message: str = ''
    result: Optional[GenerationResult] = None
    queue_s: float = 0.0
    total_s: float = 0.0
    estimate: Optional[Estimate] = None
    max_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status is RequestStatus.OK


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for diagnostics. ``budget_misses`` counts ``BUDGET_EXCEEDED`` answers."""

    active: bool
    queue_depth: int
    running: Optional[str]
    submitted: int
    answered: int
    counts: dict[str, int]
    budget_misses: int
    consecutive_errors: int
    last_ttft_s: float
    avg_ttft_s: float
    last_tokens_per_s: float
    avg_tokens_per_s: float
    rates: Rates


class _Ticket:
    """The scheduler's stateful view of one request (guarded by the scheduler lock)."""

    def __init__(self, request: ScheduledRequest, request_id: str, seq: int, arrival: float,
                 deadline: float, callback: Optional[OutcomeCallback]) -> None:
        self.request = request
        self.id = request_id
        self.seq = seq
        self.arrival = arrival
        self.deadline = deadline
        self.priority = request.priority
        self.kind = request.kind
        self.callback = callback
        self.future: Future = Future()
        self.future.set_running_or_notify_cancel()
        self.token = CancelToken()
        self.prompt_tokens = 0
        self.max_tokens = _UNBOUNDED_TOKENS
        self.run_max_tokens = 0
        self.estimate: Optional[Estimate] = None
        self.started: Optional[float] = None
        self.stopped_as: Optional[RequestStatus] = None
        self.outcome: Optional[Outcome] = None

    @classmethod
    def from_request(cls, request: ScheduledRequest, seq: int, now: float,
                     default_budget_s: float, callback: Optional[OutcomeCallback]) -> _Ticket:
        arrival = request.arrival if _is_number(request.arrival) else now
        budget = request.budget_s if _is_number(request.budget_s) else 0.0
        budget = budget if budget > 0 else default_budget_s
        request_id = request.id if isinstance(request.id, str) and request.id else \
            uuid.uuid4().hex
        return cls(request, request_id, seq, arrival, arrival + budget, callback)


class RequestHandle:
    """What ``submit`` returns: the request's id and a future of its :class:`Outcome`."""

    def __init__(self, ticket: _Ticket, scheduler: Scheduler) -> None:
        self.id = ticket.id
        self.future: Future = ticket.future
        self._scheduler = scheduler

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: Optional[float] = None) -> Outcome:
        """Wait for the outcome; raises ``concurrent.futures.TimeoutError`` on timeout."""
        return self.future.result(timeout)

    def cancel(self) -> bool:
        """Cancel through the scheduler (the future itself cannot be canceled)."""
        return self._scheduler.cancel(self.id)


class _RequestQueue:
    """A small bounded priority queue; linear scans are fine at robot queue sizes."""

    def __init__(self, policy: QueuePolicy) -> None:
        if policy is QueuePolicy.PRIORITY_EDF:
            self.key: Callable[[_Ticket], tuple] = lambda t: (-t.priority, t.deadline, t.seq)
        else:
            self.key = lambda t: (-t.priority, t.seq)
        self._items: list[_Ticket] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[_Ticket]:
        return iter(list(self._items))

    def push(self, ticket: _Ticket) -> None:
        self._items.append(ticket)

    def pop(self) -> _Ticket:
        best = min(self._items, key=self.key)
        self._items.remove(best)
        return best

    def remove(self, ticket: _Ticket) -> bool:
        try:
            self._items.remove(ticket)
        except ValueError:
            return False
        return True

    def last(self) -> Optional[_Ticket]:
        return max(self._items, key=self.key) if self._items else None

    def ahead_of(self, ticket: _Ticket) -> list[_Ticket]:
        key = self.key(ticket)
        return [t for t in self._items if self.key(t) < key]

    def drain(self) -> list[_Ticket]:
        items, self._items = self._items, []
        return items


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
        self._lock = threading.Lock()
        self._work_cv = threading.Condition(self._lock)
        self._timer_cv = threading.Condition(self._lock)
        self._backend_lock = threading.Lock()
        self._queue = _RequestQueue(QueuePolicy(self._config.queue_policy))
        self._pending: dict[str, _Ticket] = {}
        self._current: Optional[_Ticket] = None
        self._seq = itertools.count()
        self._active = True
        self._closed = False
        self._typical_prompt_tokens = 0
        self._counts: Counter = Counter()
        self._submitted = 0
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
            if self._threads or self._closed:
                return
            self._threads = [
                threading.Thread(target=self._worker_loop, name='scheduler-worker', daemon=True),
                threading.Thread(target=self._watchdog_loop, name='scheduler-watchdog',
                                 daemon=True),
            ]
        for thread in self._threads:
            thread.start()

    def warm_up(self, rounds: int = 2, max_tokens: int = 8, timeout_s: float = 60.0) -> Rates:
        """Measure prefill and decode rates with a few tiny generations and seed the estimator.

        The first of several rounds is discarded (one-time costs such as caches). Call it after
        ``Backend.load()`` and before serving; called while serving, it waits for the running
        generation and is not seen by admission control.

        :raises Exception: whatever the backend raises; a model that cannot run a tiny
            generation is not fit to serve.
        """
        filler = ' '.join(['The robot reports its position and battery level.'] * 8)
        for index in range(max(1, rounds)):
            request = GenerationRequest(
                messages=[Message('system', 'You are a robot assistant. Answer briefly.'),
                          Message('user', f'{filler} Say ready.')],
                constrained=False,
                sampling=SamplingParams(max_tokens=max(1, max_tokens)),
                deadline=time.monotonic() + timeout_s,
                cancel=CancelToken())
            counted = self._count_prompt(request)
            result, wall_s = self._generate(request)
            if index > 0 or rounds <= 1:
                self._observe(result, counted, wall_s)
        return self._estimator.rates()

    def set_active(self, active: bool) -> None:
        """Serve (True) or answer every queued, running and new request ``INACTIVE`` (False)."""
        done: list[_Ticket] = []
        with self._lock:
            self._active = bool(active) and not self._closed
            if not self._active:
                self._stop_all_locked(RequestStatus.INACTIVE, 'scheduler is not active', done)
            self._work_cv.notify_all()
        self._deliver(done)

    @property
    def active(self) -> bool:
        return self._active

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Answer everything ``INACTIVE``, cancel the running generation and join the threads.

        :returns: True when the threads ended within ``timeout`` (False if the backend ignores
            its cancel token; the threads are daemons and do not block exit).
        """
        done: list[_Ticket] = []
        with self._lock:
            self._closed = True
            self._active = False
            self._stop_all_locked(RequestStatus.INACTIVE, 'scheduler shut down', done)
            self._work_cv.notify_all()
            self._timer_cv.notify_all()
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
        ticket = _Ticket.from_request(request, next(self._seq), now,
                                      self._config.default_budget_s, callback)
        handle = RequestHandle(ticket, self)
        problem = _validate(request)
        if problem is None:
            ticket.prompt_tokens, ticket.max_tokens = self._size(request)
        done: list[_Ticket] = []
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
        done: list[_Ticket] = []
        with self._lock:
            ticket = self._pending.get(request_id)
            if ticket is None:
                return False
            self._stop_locked(ticket, RequestStatus.CANCELED, 'canceled by the caller', done)
        self._deliver(done)
        return True

    def stats(self) -> SchedulerStats:
        """Queue depth, outcome counts, TTFT and decode speed, and the estimator's rates."""
        with self._lock:
            current = self._current
            return SchedulerStats(
                active=self._active,
                queue_depth=len(self._queue),
                running=current.id if current is not None and current.outcome is None else None,
                submitted=self._submitted,
                answered=sum(self._counts.values()),
                counts={s.name: self._counts.get(s, 0) for s in RequestStatus},
                budget_misses=self._counts.get(RequestStatus.BUDGET_EXCEEDED, 0),
                consecutive_errors=self._consecutive_errors,
                last_ttft_s=self._ttft[0], avg_ttft_s=self._ttft[1],
                last_tokens_per_s=self._tps[0], avg_tokens_per_s=self._tps[1],
                rates=self._estimator.rates())

    def rates(self) -> Rates:
        """Return the estimator's current model of the backend."""
        return self._estimator.rates()

    # ----------------------------------------------------------------- admission

    def _size(self, request: ScheduledRequest) -> tuple[int, int]:
        """Prompt tokens and requested max_tokens, as far as known at submit time."""
        payload = request.payload
        if isinstance(payload, GenerationRequest):
            return self._count_prompt(payload), payload.sampling.max_tokens
        if request.prompt_tokens is not None:
            return request.prompt_tokens, _UNBOUNDED_TOKENS
        return self._typical_prompt_tokens, _UNBOUNDED_TOKENS

    def _admit_locked(self, ticket: _Ticket, now: float, done: list[_Ticket]) -> None:
        if self._closed or not self._active:
            self._resolve_locked(ticket, RequestStatus.INACTIVE, 'scheduler is not active', done)
            return
        if ticket.id in self._pending:
            self._resolve_locked(ticket, RequestStatus.INVALID_REQUEST,
                                 f'request id {ticket.id!r} is already pending', done)
            return
        preempts = self._can_preempt_locked(ticket)
        wait_s = self._wait_locked(ticket, now, preempts)
        ticket.estimate = self._estimator.estimate(ticket.prompt_tokens,
                                                   self._needed_tokens(ticket.max_tokens), wait_s)
        if now + ticket.estimate.total_s + self._config.safety_margin_s > ticket.deadline:
            self._resolve_locked(
                ticket, RequestStatus.REJECTED_BUDGET,
                f'cannot answer within {_ms(ticket.deadline - ticket.arrival)}'
                f' ({_ms(ticket.deadline - now)} left): {ticket.estimate.describe()}', done)
            return
        if not self._make_room_locked(ticket, done):
            return
        self._queue.push(ticket)
        self._pending[ticket.id] = ticket
        if preempts:
            current = self._current
            self._stop_locked(current, RequestStatus.PREEMPTED,
                              f'preempted by request {ticket.id!r} (priority {ticket.priority}'
                              f' > {current.priority})', done)
        self._work_cv.notify()
        self._timer_cv.notify()

    def _make_room_locked(self, ticket: _Ticket, done: list[_Ticket]) -> bool:
        if len(self._queue) < self._config.max_queue:
            return True
        last = self._queue.last()
        if (self._config.evict_lower_priority and last is not None
                and last.priority < ticket.priority):
            self._queue.remove(last)
            self._resolve_locked(last, RequestStatus.REJECTED_BUSY,
                                 f'evicted from the full queue by higher-priority request'
                                 f' {ticket.id!r}', done)
            return True
        self._resolve_locked(ticket, RequestStatus.REJECTED_BUSY,
                             f'queue full ({len(self._queue)} requests waiting)', done)
        return False

    def _can_preempt_locked(self, ticket: _Ticket) -> bool:
        current = self._current
        return (current is not None and current.outcome is None
                and ticket.kind in self._config.preempting_kinds
                and current.kind in self._config.preemptible_kinds
                and ticket.priority > current.priority)

    def _wait_locked(self, ticket: _Ticket, now: float, preempts: bool) -> float:
        """Estimate the wait until ``ticket`` starts: the running request, then those ahead."""
        wait = 0.0 if preempts else self._remaining_locked(now)
        for other in self._queue.ahead_of(ticket):
            wait += self._expected_service(other, now)
        return wait

    def _remaining_locked(self, now: float) -> float:
        current = self._current
        if current is None or current.outcome is not None or current.started is None:
            return 0.0
        end = current.started + self._expected_service(current, current.started)
        return max(0.0, min(end, current.deadline) - now)

    def _expected_service(self, ticket: _Ticket, now: float) -> float:
        """Typical service time, never more than the time left to its deadline."""
        tokens = self._estimator.expected_tokens(ticket.max_tokens)
        service = self._estimator.estimate(ticket.prompt_tokens, tokens).service_s
        return min(service, max(0.0, ticket.deadline - now))

    def _min_service(self, ticket: _Ticket) -> float:
        tokens = self._needed_tokens(ticket.max_tokens)
        return self._estimator.estimate(ticket.prompt_tokens, tokens).service_s

    def _needed_tokens(self, max_tokens: int) -> int:
        return max(1, min(max_tokens, self._config.min_new_tokens))

    # ----------------------------------------------------------------- outcomes

    def _resolve_locked(self, ticket: _Ticket, status: RequestStatus, message: str,
                        done: list[_Ticket], result: Optional[GenerationResult] = None,
                        max_tokens: int = 0) -> bool:
        """Set the outcome once; the caller delivers ``done`` after releasing the lock."""
        if ticket.outcome is not None:
            return False
        now = time.monotonic()
        if status is RequestStatus.OK and now > ticket.deadline:
            status = RequestStatus.BUDGET_EXCEEDED
            message = f'answer came {_ms(now - ticket.deadline)} after the deadline'
        ticket.outcome = Outcome(
            request_id=ticket.id, status=status, status_message=message, result=result,
            queue_s=max(0.0, (now if ticket.started is None else ticket.started)
                        - ticket.arrival),
            total_s=max(0.0, now - ticket.arrival), estimate=ticket.estimate,
            max_tokens=max_tokens or ticket.run_max_tokens)
        if self._pending.get(ticket.id) is ticket:
            del self._pending[ticket.id]
        self._counts[status] += 1
        done.append(ticket)
        if status is not RequestStatus.OK:
            _LOG.debug('request %s: %s (%s)', ticket.id, status.name, message)
        return True

    def _finish(self, ticket: _Ticket, status: RequestStatus, message: str,
                result: Optional[GenerationResult] = None, max_tokens: int = 0) -> None:
        done: list[_Ticket] = []
        with self._lock:
            self._resolve_locked(ticket, status, message, done, result, max_tokens)
        self._deliver(done)

    def _stop_locked(self, ticket: _Ticket, status: RequestStatus, message: str,
                     done: list[_Ticket]) -> None:
        """Answer a pending request now; a running one also gets its cancel token set."""
        if ticket is self._current:
            ticket.stopped_as = status
            reason = FinishReason.DEADLINE if status is RequestStatus.BUDGET_EXCEEDED \
                else FinishReason.CANCELLED
            ticket.token.cancel(reason)
        else:
            self._queue.remove(ticket)
        self._resolve_locked(ticket, status, message, done)

    def _stop_all_locked(self, status: RequestStatus, message: str,
                         done: list[_Ticket]) -> None:
        for ticket in self._queue.drain():
            self._resolve_locked(ticket, status, message, done)
        if self._current is not None and self._current.outcome is None:
            self._stop_locked(self._current, status, message, done)

    @staticmethod
    def _deliver(done: list[_Ticket]) -> None:
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
        while True:
            with self._lock:
                while not self._closed and not (self._active and len(self._queue)):
                    self._work_cv.wait()
                if self._closed:
                    return
                ticket = self._queue.pop()
                ticket.started = time.monotonic()
                self._current = ticket
                self._timer_cv.notify()
            try:
                self._run(ticket)
            except Exception as exc:  # defensive: every request gets an answer
                _LOG.exception('scheduler failed on request %s', ticket.id)
                self._finish(ticket, RequestStatus.ERROR, f'scheduler error: {exc!r}')
            finally:
                with self._lock:
                    self._current = None
                    self._timer_cv.notify()

    def _run(self, ticket: _Ticket) -> None:
        request = self._build(ticket)
        if request is None:
            return
        counted = ticket.prompt_tokens
        if not isinstance(ticket.request.payload, GenerationRequest):
            counted = ticket.prompt_tokens = self._count_prompt(request)
            ticket.max_tokens = request.sampling.max_tokens
        planned = self._plan(ticket, request, counted)
        if planned is None:
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
        self._observe(result, counted, wall_s)
        self._count_error(result.finish_reason is FinishReason.ERROR)
        capped = planned.sampling.max_tokens < request.sampling.max_tokens
        status, message = self._classify(ticket, result, planned.sampling.max_tokens, capped)
        self._finish(ticket, status, message, result, planned.sampling.max_tokens)

    def _build(self, ticket: _Ticket) -> Optional[GenerationRequest]:
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

    def _plan(self, ticket: _Ticket, request: GenerationRequest,
              counted: int) -> Optional[GenerationRequest]:
        """Re-check the deadline at dispatch and fit max_tokens into the time left."""
        now = time.monotonic()
        waited = now - ticket.arrival
        if now >= ticket.deadline:
            self._finish(ticket, RequestStatus.BUDGET_EXCEEDED,
                         f'deadline passed while queued (waited {_ms(waited)})')
            return None
        left = ticket.deadline - now - self._config.safety_margin_s
        cap = self._estimator.tokens_within(left, counted)
        own = request.sampling.max_tokens
        if cap < self._needed_tokens(own):
            ticket.estimate = self._estimator.estimate(counted, self._needed_tokens(own))
            self._finish(ticket, RequestStatus.REJECTED_BUDGET,
                         f'only {_ms(ticket.deadline - now)} left after waiting {_ms(waited)}:'
                         f' {ticket.estimate.describe()}')
            return None
        deadline = ticket.deadline if request.deadline is None else \
            min(ticket.deadline, request.deadline)
        ticket.run_max_tokens = min(own, cap)
        return replace(request, deadline=deadline, cancel=ticket.token,
                       sampling=replace(request.sampling, max_tokens=ticket.run_max_tokens))

    def _generate(self, request: GenerationRequest) -> tuple[GenerationResult, float]:
        with self._backend_lock:
            start = time.monotonic()
            result = self._backend.generate(request)
            return result, time.monotonic() - start

    def _classify(self, ticket: _Ticket, result: GenerationResult, max_tokens: int,
                  capped: bool) -> tuple[RequestStatus, str]:
        """Map a finished generation to a status; a late answer is never OK."""
        finished = time.monotonic()
        reason = result.finish_reason
        if ticket.stopped_as is not None:
            return ticket.stopped_as, 'stopped'
        if reason is FinishReason.DEADLINE or (
                ticket.token.cancelled and ticket.token.reason is FinishReason.DEADLINE):
            return (RequestStatus.BUDGET_EXCEEDED,
                    f'stopped at the deadline after {result.usage.completion_tokens} tokens')
        if finished > ticket.deadline:
            return (RequestStatus.BUDGET_EXCEEDED,
                    f'answer came {_ms(finished - ticket.deadline)} after the deadline')
        if reason is FinishReason.ERROR:
            return RequestStatus.ERROR, f'backend error: {result.error or "unknown"}'
        if reason is FinishReason.CANCELLED:
            return RequestStatus.CANCELED, 'generation was canceled'
        if reason is FinishReason.LENGTH and capped:
            return (RequestStatus.BUDGET_EXCEEDED,
                    f'stopped at {max_tokens} tokens, the most the budget allows')
        if reason is FinishReason.LENGTH:
            return RequestStatus.OK, f'stopped at max_tokens ({max_tokens})'
        return RequestStatus.OK, ''

    def _observe(self, result: GenerationResult, counted: int, wall_s: float) -> None:
        usage = result.usage
        self._estimator.observe(usage, counted, wall_s)
        with self._lock:
            if counted > 0:
                self._typical_prompt_tokens = counted
            alpha = self._config.estimator.alpha
            if usage.completion_tokens > 0 and usage.time_to_first_token_s > 0:
                self._ttft = _ema_pair(self._ttft, usage.time_to_first_token_s, alpha)
            if usage.tokens_per_second > 0:
                self._tps = _ema_pair(self._tps, usage.tokens_per_second, alpha)
            self._timer_cv.notify()

    def _count_error(self, failed: bool) -> None:
        with self._lock:
            self._consecutive_errors = self._consecutive_errors + 1 if failed else 0

    def _count_prompt(self, request: GenerationRequest) -> int:
        """Tokens in the message texts (the estimator calibrates template and cache effects)."""
        text = '\n'.join(m.content for m in request.messages)
        try:
            return int(self._backend.count_tokens(text))
        except Exception:  # a rough count is better than no admission control
            return len(text) // 4 + 1

    # ----------------------------------------------------------------- watchdog

    def _watchdog_loop(self) -> None:
        while True:
            done: list[_Ticket] = []
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                self._expire_locked(now, done)
                if not done:
                    self._timer_cv.wait(self._next_wake_locked(now))
            self._deliver(done)

    def _expire_locked(self, now: float, done: list[_Ticket]) -> None:
        """Answer queued requests that can no longer make it, and a running overrun."""
        margin = self._config.safety_margin_s
        for ticket in self._queue:
            waited = now - ticket.arrival
            if now >= ticket.deadline:
                self._stop_locked(ticket, RequestStatus.BUDGET_EXCEEDED,
                                  f'deadline passed while queued (waited {_ms(waited)})', done)
            elif now + self._min_service(ticket) + margin > ticket.deadline:
                self._stop_locked(ticket, RequestStatus.REJECTED_BUDGET,
                                  f'can no longer answer by the deadline after waiting'
                                  f' {_ms(waited)} ({_ms(ticket.deadline - now)} left)', done)
        current = self._current
        if (current is not None and current.outcome is None
                and now >= current.deadline + self._config.deadline_grace_s):
            self._stop_locked(current, RequestStatus.BUDGET_EXCEEDED,
                              'no answer by the deadline; generation stopped', done)

    def _next_wake_locked(self, now: float) -> Optional[float]:
        margin = self._config.safety_margin_s
        wakes = [t.deadline - self._min_service(t) - margin for t in self._queue]
        current = self._current
        if current is not None and current.outcome is None:
            wakes.append(current.deadline + self._config.deadline_grace_s)
        if not wakes:
            return None
        return min(1.0, max(0.0005, min(wakes) - now))


def _validate(request: ScheduledRequest) -> Optional[str]:
    """Why a request is malformed, or None."""
    if not isinstance(request.id, str):
        return f'request id must be a string, got {type(request.id).__name__}'
    if not (_is_number(request.budget_s) and request.budget_s >= 0):
        return f'budget_s must be a finite number >= 0, got {request.budget_s!r}'
    if isinstance(request.priority, bool) or not isinstance(request.priority, int):
        return f'priority must be an int, got {request.priority!r}'
    if not isinstance(request.kind, RequestKind):
        return f'kind must be a RequestKind, got {request.kind!r}'
    if request.arrival is not None and not _is_number(request.arrival):
        return f'arrival must be a finite time.monotonic() value, got {request.arrival!r}'
    if request.prompt_tokens is not None and not (
            isinstance(request.prompt_tokens, int) and request.prompt_tokens >= 0):
        return f'prompt_tokens must be an int >= 0, got {request.prompt_tokens!r}'
    if not (isinstance(request.payload, GenerationRequest) or callable(request.payload)):
        return ('payload must be a GenerationRequest or a factory returning one, got'
                f' {type(request.payload).__name__}')
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _ema_pair(pair: tuple[float, float], sample: float, alpha: float) -> tuple[float, float]:
    last, avg = pair
    return sample, sample if avg == 0.0 else avg + alpha * (sample - avg)


def _ms(seconds: float) -> str:
    return f'{seconds * 1000.0:.0f} ms'
