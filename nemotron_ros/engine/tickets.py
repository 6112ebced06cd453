"""The scheduler's data: statuses, requests, outcomes, tickets, the queue and shared state.

Plain data and small containers shared by :mod:`.scheduler`, :mod:`.admission` and
:mod:`.watchdog`; no threads are started here. Everything in :class:`SchedulerState` is
guarded by its ``lock``.
"""

from __future__ import annotations

import enum
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional, Union

from .estimator import Estimate, EstimatorConfig, Rates
from .types import CancelToken, FinishReason, GenerationRequest, GenerationResult, Usage

UNBOUNDED_TOKENS = 2 ** 31 - 1


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
    INVALID_OUTPUT = 9


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
    :param min_new_tokens: the fewest tokens admission plans an answer with, whatever the
        learned lengths say (never more than the request's own ``max_tokens``).
    :param answer_quantile: admission plans a request's own answer at this quantile of the
        recent answer lengths, so that most admitted answers fit before their deadline.
    :param safety_margin_s: slack kept between the estimated finish and the deadline.
    :param stop_lead_s: the backend is told to stop this much plus one decode step before the
        deadline, so that a cut answer (usage, partial text) is in hand by the deadline.
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
    answer_quantile: float = 0.9
    safety_margin_s: float = 0.005
    stop_lead_s: float = 0.005
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
        if not (0.0 < self.answer_quantile <= 1.0):
            raise ValueError(f'answer_quantile must be in (0, 1], got {self.answer_quantile}')
        for name in ('safety_margin_s', 'stop_lead_s', 'deadline_grace_s'):
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

    The scheduler owns the generation's ``deadline`` (a little before the earlier of the
    budget's and the payload's own), ``cancel`` token (cancel through
    :meth:`Scheduler.cancel`) and may lower ``sampling.max_tokens`` to what the budget allows;
    every other field is passed through.

    :param payload: the generation, or a factory called once on the worker thread right before
        generation starts (so a rendered world state is as fresh as possible). A factory may
        raise ``ValueError`` to reject the request as invalid.
    :param id: echoed in the outcome; generated when empty; unique among pending requests.
    :param budget_s: time allowed from ``arrival`` to the answer; 0 means the default budget.
    :param priority: higher runs first and may preempt (see :class:`SchedulerConfig`).
    :param kind: where the request came from.
    :param arrival: ``time.monotonic()`` when the request reached the node; now when None.
    :param prompt_tokens: for a factory payload, the tokens its generation will evaluate
        (``Backend.count_new_tokens``), for admission; counted again at dispatch.
    :param max_tokens: for a factory payload, its generation's ``sampling.max_tokens``.
    """

    payload: Union[GenerationRequest, GenerationFactory]
    id: str = ''
    budget_s: float = 0.0
    priority: int = 0
    kind: RequestKind = RequestKind.TOPIC
    arrival: Optional[float] = None
    prompt_tokens: Optional[int] = None
    max_tokens: Optional[int] = None


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
    """A snapshot for diagnostics.

    ``budget_misses`` counts ``BUDGET_EXCEEDED`` answers; ``dropped_tool_calls`` counts tool
    calls the model wrote that were not passed on (refused by validation, or cut by a limit).
    """

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
    dropped_tool_calls: int = 0


class Progress:
    """What the running generation has streamed so far (written by the worker thread).

    ``max_gap_s`` is the longest time between two streamed pieces: one decode step of this
    generation, slow ``on_token`` consumers included.
    """

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.first_at = 0.0
        self.last_at = 0.0
        self.max_gap_s = 0.0

    def add(self, piece: str) -> None:
        now = time.monotonic()
        if self.pieces:
            self.max_gap_s = max(self.max_gap_s, now - self.last_at)
        else:
            self.first_at = now
        self.last_at = now
        self.pieces.append(piece)

    @property
    def tokens(self) -> int:
        return len(self.pieces)


class Ticket:
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
        self.max_tokens = UNBOUNDED_TOKENS
        self.run_max_tokens = 0
        self.estimate: Optional[Estimate] = None
        self.started: Optional[float] = None
        self.progress = Progress()
        self.stopped_as: Optional[RequestStatus] = None
        self.outcome: Optional[Outcome] = None

    @classmethod
    def from_request(cls, request: ScheduledRequest, seq: int, now: float,
                     default_budget_s: float, callback: Optional[OutcomeCallback]) -> Ticket:
        arrival = request.arrival if is_number(request.arrival) else now
        budget = request.budget_s if is_number(request.budget_s) else 0.0
        budget = budget if budget > 0 else default_budget_s
        request_id = request.id if isinstance(request.id, str) and request.id else \
            uuid.uuid4().hex
        return cls(request, request_id, seq, arrival, arrival + budget, callback)

    def partial_result(self) -> Optional[GenerationResult]:
        """What a generation still running has produced, for an answer given without it."""
        if self.started is None:
            return None
        progress = self.progress
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=progress.tokens,
                      total_s=max(0.0, time.monotonic() - self.started))
        if progress.first_at:
            usage.time_to_first_token_s = progress.first_at - self.started
            usage.decode_s = max(0.0, time.monotonic() - progress.first_at)
        return GenerationResult(raw_text=''.join(progress.pieces),
                                finish_reason=FinishReason.DEADLINE, usage=usage)


class RequestHandle:
    """What ``submit`` returns: the request's id and a future of its :class:`Outcome`."""

    def __init__(self, ticket: Ticket, cancel: Callable[[str], bool]) -> None:
        self.id = ticket.id
        self.future: Future = ticket.future
        self._cancel = cancel

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: Optional[float] = None) -> Outcome:
        """Wait for the outcome; raises ``concurrent.futures.TimeoutError`` on timeout."""
        return self.future.result(timeout)

    def cancel(self) -> bool:
        """Cancel through the scheduler (the future itself cannot be canceled)."""
        return self._cancel(self.id)


class RequestQueue:
    """A small bounded priority queue; linear scans are fine at robot queue sizes."""

    def __init__(self, policy: QueuePolicy) -> None:
        if policy is QueuePolicy.PRIORITY_EDF:
            self.key: Callable[[Ticket], tuple] = lambda t: (-t.priority, t.deadline, t.seq)
        else:
            self.key = lambda t: (-t.priority, t.seq)
        self._items: list[Ticket] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Ticket]:
        return iter(list(self._items))

    def push(self, ticket: Ticket) -> None:
        self._items.append(ticket)

    def pop(self) -> Ticket:
        best = min(self._items, key=self.key)
        self._items.remove(best)
        return best

    def remove(self, ticket: Ticket) -> bool:
        try:
            self._items.remove(ticket)
        except ValueError:
            return False
        return True

    def last(self) -> Optional[Ticket]:
        return max(self._items, key=self.key) if self._items else None

    def ordered(self) -> list[Ticket]:
        """The waiting requests in the order they will run."""
        return sorted(self._items, key=self.key)

    def drain(self) -> list[Ticket]:
        items, self._items = self._items, []
        return items


class SchedulerState:
    """The state the scheduler, admission and watchdog share; guarded by ``lock``.

    ``work`` wakes the worker (a request queued, activity changed); ``timer`` wakes the
    watchdog (a deadline to watch changed).
    """

    def __init__(self, policy: QueuePolicy) -> None:
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.timer = threading.Condition(self.lock)
        self.queue = RequestQueue(policy)
        self.pending: dict[str, Ticket] = {}
        self.current: Optional[Ticket] = None
        self.active = True
        self.closed = False
        self.inactive_reason = 'scheduler is not active'

    def running(self) -> Optional[Ticket]:
        """The request being generated, when it has not been answered yet."""
        current = self.current
        return current if current is not None and current.outcome is None else None


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def ms(seconds: float) -> str:
    return f'{seconds * 1000.0:.0f} ms'
