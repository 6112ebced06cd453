"""Multi-step tasks: tool calls go out, their results come back, the model continues.

A *task* is one request that may take several *steps*; a step is one generation
(:meth:`.Engine.submit` of a prompt whose id is ``'<task id>#<k>'``). When a step answers with
tool calls and the task has steps left, the manager hands the calls out through the task's
:class:`TaskListener` and waits for a result for each call (:meth:`TaskManager.tool_result`).
Once every call has one, the assistant turn with its calls and one tool turn per result are
appended to the task's conversation and the next step is queued like any request, with the
deadline that is left. The task ends with exactly one ``step(final=True)``: a text-only answer,
``max_steps`` reached, any non-OK step (budget, cancel, preemption, error, inactive), the
deadline passing while waiting, or a conversation that would outgrow ``max_task_tokens``.

Promises, each kept by one rule:

* **Exactly one final step per task.** A task is ended under the manager's lock, once; every
  later outcome, result, decision or timer for it finds it ended and does nothing.
* **A held call is never released unapproved.** A call to a tool with
  ``requires_confirmation`` is only announced (``pending``); ``release`` is called for it in
  exactly one place, :meth:`TaskManager.confirm` with ``approve`` True, and only while it is
  still held (not denied, timed out or withdrawn).
* **No wait without a deadline.** Each call has a result timeout (the tool's
  ``result_timeout_s`` or ``tool_result_timeout_ms``), each held call a confirmation timeout,
  and the task's own deadline bounds the whole wait. A missing result, a denial or no
  decision becomes a *failed* result the model sees ("no result within 30 s").
* **Waiting holds no model time**, and :meth:`~TaskManager.tool_result`,
  :meth:`~TaskManager.confirm` and :meth:`~TaskManager.cancel` do O(1) work under the lock:
  next steps are rendered, counted and submitted by the manager's own worker thread.
* **Bounded memory.** A task's state is dropped when it ends; only its id is remembered, in a
  bounded LRU, to tell a result for a finished task from one for an unknown task.

Threads: one worker runs every listener call and next-step submit in the order the decisions
were taken (so a step's calls always follow its ``step`` event), and one timer thread runs
the timeouts. Jobs run one at a time, in order; when the worker is idle, a step's answer and
the listener calls it causes run on the thread that delivered it (see
:meth:`TaskManager._step_answered`). Listener methods must be short and must not block
(publish and return); they may call back into the manager.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from .config import TaskConfig
from .json_input import loads_bounded
from .runtime import INACTIVE_REASON, Engine, Prompt, new_request_id
from .scheduler import Outcome, RequestStatus
from .settings import SETTINGS
from .types import Message, ToolCall

_LOG = logging.getLogger(__name__)

#: Most steps a request may ask for (the ``max_steps`` parameter's limit).
MAX_STEPS = SETTINGS['max_steps'].high
WAITING_FOR_RESULTS_DEADLINE = 'deadline passed while waiting for tool results'
WAITING_FOR_CONFIRMATION_DEADLINE = 'deadline passed while waiting for confirmation'
LATE_STEP_DEADLINE = "the deadline passed before the step's tool calls could be sent"
TASK_ENDED = 'task ended'
#: Seconds between two log lines about dropped results of one kind.
LOG_PERIOD_S = 5.0


class TaskState(str, enum.Enum):
    """What a running task is doing (``action/Execute`` feedback ``state``)."""

    GENERATING = 'generating'
    WAITING_FOR_RESULTS = 'waiting_for_results'
    WAITING_FOR_CONFIRMATION = 'waiting_for_confirmation'


class ResultDisposition(str, enum.Enum):
    """What :meth:`TaskManager.tool_result` did with a result; all but ACCEPTED are dropped."""

    ACCEPTED = 'accepted'
    UNKNOWN_TASK = 'unknown_task'
    UNKNOWN_CALL = 'unknown_call'
    DUPLICATE = 'duplicate'
    LATE = 'late'  # after the call's synthetic result (timeout, denial, no decision)
    FINISHED_TASK = 'finished_task'
    INVALID_CONTENT = 'invalid_content'
    NOT_RELEASED = 'not_released'  # for a held call: no executor can have been given it


@dataclass(frozen=True)
class TaskCall:
    """One validated call of a step, as executors and operators see it.

    ``call_id`` is unique within the task (``call_<n>``, n counting the task's calls), so a
    late result for an earlier step can never be taken for a later step's call.
    """

    request_id: str
    call_id: str
    name: str
    arguments_json: str
    requires_confirmation: bool


@dataclass(frozen=True)
class StepOutcome:
    """One step's answer; the node turns it into an Action.

    :param outcome: the step's engine outcome, with ``request_id`` the task's id and the
        result's ``tool_calls`` carrying the task-wide call ids of ``calls``. The final step
        of a task that ended between generations (cancel, deadline, ``max_task_tokens``) has
        an outcome without a result.
    :param step: 0-based; a final step that never ran has the index the next step would have.
    :param final: True exactly once per task, on its last step.
    :param calls: the step's validated calls, held ones flagged (empty unless OK).
    """

    outcome: Outcome
    step: int
    final: bool
    calls: tuple[TaskCall, ...] = ()


class TaskListener(Protocol):
    """The node's side of one task; called from the manager's worker thread, in order."""

    def step(self, step: StepOutcome) -> None:
        """Every step, the final one included (``final`` True exactly once, last)."""

    def release(self, call: TaskCall) -> None:
        """Publish ``call`` on ``tool_calls``: it needs no confirmation, or was approved.

        An approved call of a task's final step may come after the final step.
        """

    def pending(self, call: TaskCall) -> None:
        """Publish ``call`` on ``confirmations_pending``: it waits for an operator."""

    def state(self, step: int, state: TaskState) -> None:
        """The task's state changed (execute feedback)."""


@dataclass(frozen=True)
class TaskStats:
    """A snapshot for diagnostics.

    :param running: tasks not yet ended. :param held: calls waiting for a decision.
    :param withdrawn: held calls dropped because their task ended (cancel, stop_all ...).
    :param refused_confirmations: ``confirm`` calls answered accepted False.
    :param results: tool results by :class:`ResultDisposition` value (accepted included).
    :param finals: ended tasks by final status name.
    :param remembered: ended task ids kept to classify late results (bounded).
    :param timers: timeouts armed (bounded by the running tasks' calls).
    """

    running: int
    held: int
    started: int
    steps: int
    finals: dict[str, int]
    results: dict[str, int]
    result_timeouts: int
    approved: int
    denied: int
    confirmation_timeouts: int
    withdrawn: int
    refused_confirmations: int
    remembered: int
    timers: int

    @property
    def dropped_results(self) -> int:
        """Results ignored for any reason (unknown, duplicate, late, invalid ...)."""
        return sum(n for name, n in self.results.items()
                   if name != ResultDisposition.ACCEPTED.value)


class _CallState(str, enum.Enum):
    HELD = 'waiting for confirmation'
    RUNNING = 'waiting for its result'
    DONE = 'answered'
    TIMED_OUT = 'timed out'
    DENIED = 'denied'
    UNCONFIRMED = 'not confirmed in time'
    RELEASED = 'approved and released'
    WITHDRAWN = 'withdrawn'


#: What a result for a call in each state (other than RUNNING) is.
_DISPOSITION = {
    _CallState.HELD: ResultDisposition.NOT_RELEASED,
    _CallState.DENIED: ResultDisposition.NOT_RELEASED,
    _CallState.UNCONFIRMED: ResultDisposition.NOT_RELEASED,
    _CallState.WITHDRAWN: ResultDisposition.NOT_RELEASED,
    _CallState.TIMED_OUT: ResultDisposition.LATE,
    _CallState.DONE: ResultDisposition.DUPLICATE,
    _CallState.RELEASED: ResultDisposition.DUPLICATE,
}


class _Timer:
    """One timeout on the manager's heap; cancelled ones are skipped (and compacted away)."""

    __slots__ = ('when', 'seq', 'fn', 'args', 'cancelled')

    def __init__(self, when: float, seq: int, fn: Callable[..., None], args: tuple) -> None:
        self.when, self.seq, self.fn, self.args = when, seq, fn, args
        self.cancelled = False

    def __lt__(self, other: _Timer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


@dataclass(eq=False)
class _Call:
    """A call's state; ``task`` is None for a held call of a final step (no result wanted)."""

    call: TaskCall
    task: Optional[_Task]
    listener: TaskListener
    state: _CallState = _CallState.RUNNING
    timeout_s: float = 0.0
    success: bool = False
    content: Any = None
    timer: Optional[_Timer] = None


@dataclass(eq=False)
class _Task:
    id: str
    prompt: Prompt
    listener: TaskListener
    max_steps: int
    publish_final_calls: bool
    deadline: float
    step: int = 0
    state: TaskState = TaskState.GENERATING
    ended: bool = False
    cancel_requested: bool = False
    history: tuple[Message, ...] = ()
    assistant: Optional[Message] = None
    calls: dict[str, _Call] = field(default_factory=dict)  # this step's, in order
    past: dict[str, tuple[str, _CallState]] = field(default_factory=dict)  # earlier calls
    outstanding: int = 0  # this step's calls without a result
    held: int = 0  # this step's calls waiting for a decision
    call_count: int = 0
    deadline_timer: Optional[_Timer] = None

    @property
    def step_id(self) -> str:
        return f'{self.id}#{self.step}'

    @property
    def arrival(self) -> float:
        return self.prompt.arrival


class TaskManager:
    """Runs multi-step tasks on an :class:`.Engine` (see the module docstring); thread-safe."""

    def __init__(self, engine: Engine, config: TaskConfig) -> None:
        self._engine = engine
        self._config = config
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._tick = threading.Condition(self._lock)
        self._jobs: collections.deque[tuple[Callable[..., None], tuple]] = collections.deque()
        self._running = False  # a thread is running jobs: the worker, or see _step_answered
        self._timers: list[_Timer] = []
        self._cancelled_timers = 0
        self._seq = itertools.count()
        self._tasks: dict[str, _Task] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._held_final: dict[tuple[str, str], _Call] = {}
        self._closed = False
        self._counts: collections.Counter = collections.Counter()
        self._finals: collections.Counter = collections.Counter()
        self._results: collections.Counter = collections.Counter()
        self._throttle = _LogThrottle(LOG_PERIOD_S)
        self._worker = threading.Thread(target=self._work_loop, name='tasks-worker',
                                        daemon=True)
        self._timer_thread = threading.Thread(target=self._timer_loop, name='tasks-timers',
                                              daemon=True)
        self._worker.start()
        self._timer_thread.start()

    # -- configuration and lifecycle ------------------------------------------------------
    def configure(self, config: TaskConfig) -> None:
        """Use ``config`` for tasks started from now on (the node's configure transition)."""
        with self._lock:
            self._config = config

    def stop_all(self, status: RequestStatus, reason: str) -> None:
        """End every running task with one final step (``status``, ``reason``) at once.

        For deactivate, cleanup and shutdown. Their generations are canceled in the engine
        and every held call, of running tasks and of final steps alike, is withdrawn: a later
        ``confirm`` is refused and nothing held is ever released.
        """
        with self._lock:
            generating = self._stop_all_locked(status, reason)
        for step_id in generating:
            self._engine.cancel(step_id)

    def _stop_all_locked(self, status: RequestStatus, reason: str) -> list[str]:
        """End every task and withdraw every held call; returns the steps to cancel."""
        generating = [t.step_id for t in self._tasks.values()
                      if t.state is TaskState.GENERATING]
        for task in list(self._tasks.values()):
            self._end_locked(task, self._outcome(task, status, reason))
        for call in self._held_final.values():
            self._withdraw_locked(call)
        self._held_final.clear()
        return generating

    def close(self) -> None:
        """End every task INACTIVE, deliver what is pending and stop the threads. Idempotent.

        Afterwards ``start`` answers INACTIVE at once (on the caller's thread).
        """
        with self._lock:  # one section: no task can start between the stop and the close
            generating = self._stop_all_locked(RequestStatus.INACTIVE, INACTIVE_REASON)
            self._closed = True
            self._work.notify_all()
            self._tick.notify_all()
        for step_id in generating:
            self._engine.cancel(step_id)
        current = threading.current_thread()
        for thread in (self._worker, self._timer_thread):
            if thread is not current:
                thread.join(timeout=5.0)

    # -- tasks ----------------------------------------------------------------------------
    def start(self, prompt: Prompt, max_steps: int, listener: TaskListener, *,
              publish_final_calls: bool) -> str:
        """Start a task; its steps and calls reach ``listener``. Returns the task id.

        Never raises: whatever happens, ``listener.step`` gets exactly one final step.
        Submits the first step on the caller's thread (it tokenizes, like
        :meth:`.Engine.submit`: call it from an intake thread, not a DDS callback).

        :param max_steps: 0 = the configured ``max_steps``; at most :data:`MAX_STEPS`.
        :param publish_final_calls: release the final step's calls that need no confirmation
            (topic commands); False when they go back to the caller (plan, execute). Held
            calls are released only on approval either way.
        """
        task_id = getattr(prompt, 'id', '')
        task_id = task_id if isinstance(task_id, str) and task_id else new_request_id()
        arrival = getattr(prompt, 'arrival', None)
        if not isinstance(arrival, (int, float)) or isinstance(arrival, bool):
            arrival = time.monotonic()
        try:
            prompt = dataclasses.replace(prompt, id=task_id, arrival=arrival)
        except Exception as exc:  # not a Prompt at all: answer instead of raising
            _LOG.exception('task %s could not start', task_id)
            outcome = Outcome(request_id=task_id, status=RequestStatus.ERROR,
                              status_message=f'could not start the task: '
                                             f'{type(exc).__name__}: {exc}',
                              total_s=max(0.0, time.monotonic() - arrival))
            _notify(listener.step, StepOutcome(outcome, 0, True))
            return task_id
        problem = ''
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or \
                not 0 <= max_steps <= MAX_STEPS:
            problem = (f'max_steps must be in [0, {MAX_STEPS}] (0 = the max_steps parameter), '
                       f'got {max_steps!r}')
        budget_ms = prompt.budget_ms if isinstance(prompt.budget_ms, int) and \
            prompt.budget_ms > 0 else 0
        deadline = arrival + self._engine.budget_s(budget_ms)
        status, closed = RequestStatus.INVALID_REQUEST, False
        with self._lock:
            if self._closed:
                status, problem, closed = RequestStatus.INACTIVE, INACTIVE_REASON, True
            elif task_id in self._tasks:
                problem = f'request id {task_id!r} is already running'
            if problem:
                self._finals[status.name] += 1
                refusal = StepOutcome(Outcome(
                    request_id=task_id, status=status, status_message=problem,
                    total_s=max(0.0, time.monotonic() - arrival)), 0, True)
                if not closed:
                    self._emit(listener.step, refusal)
            else:
                task = _Task(id=task_id, prompt=prompt, listener=listener,
                             max_steps=max_steps or self._config.max_steps,
                             publish_final_calls=bool(publish_final_calls), deadline=deadline)
                self._tasks[task_id] = task
                self._finished.pop(task_id, None)
                self._counts['started'] += 1
                self._emit(listener.state, 0, TaskState.GENERATING)
        if problem:
            if closed:  # the worker has stopped: answer on this thread
                _notify(listener.step, refusal)
            return task_id
        self._submit_step(task)
        return task_id

    def cancel(self, request_id: str) -> bool:
        """Cancel a running task in any state; False when it is not running.

        Generating: the engine cancels the step and the task ends CANCELED with that step.
        Waiting for results or confirmation: it ends CANCELED at once and its held calls are
        withdrawn.
        """
        with self._lock:
            task = self._tasks.get(request_id)
            if task is None:
                return False
            if task.state is not TaskState.GENERATING:
                waiting = ('confirmation' if task.state is TaskState.WAITING_FOR_CONFIRMATION
                           else 'tool results')
                self._end_locked(task, self._outcome(
                    task, RequestStatus.CANCELED,
                    f'canceled by the caller while waiting for {waiting}'))
                return True
            task.cancel_requested = True
            step_id = task.step_id
        self._engine.cancel(step_id)
        return True

    # -- results and decisions ------------------------------------------------------------
    def tool_result(self, request_id: str, call_id: str, name: str, success: bool,
                    content_json: str) -> ResultDisposition:
        """Take an executor's result for one call; anything but ACCEPTED is dropped.

        Every disposition is counted (:meth:`stats`); dropped ones are logged, throttled.
        ``content_json`` '' means no content; otherwise it must be JSON (nested at most 32
        levels, at most ``max_result_chars`` long). ``name``, when given, must be the call's.
        """
        disposition = self._take_result(request_id, call_id, name, success, content_json)
        if disposition is ResultDisposition.FINISHED_TASK:
            # Routine: an executor answers the released calls of a command's final step too.
            _LOG.debug('tool result for finished task %r, call %r', request_id, call_id)
        elif disposition is not ResultDisposition.ACCEPTED:
            self._throttle.log(disposition.value, 'dropped a tool result (%s): request %r, '
                               'call %r', disposition.value, request_id, call_id)
        return disposition

    def _take_result(self, request_id: str, call_id: str, name: str, success: bool,
                     content_json: str) -> ResultDisposition:
        try:
            content = self._parse_content(content_json)
        except ValueError:
            return self._count_result(ResultDisposition.INVALID_CONTENT)
        with self._lock:
            task = self._tasks.get(request_id)
            if task is None:
                return self._count_result_locked(
                    ResultDisposition.FINISHED_TASK if request_id in self._finished
                    else ResultDisposition.UNKNOWN_TASK)
            call = task.calls.get(call_id)
            known, state = ((call.call.name, call.state) if call is not None
                            else task.past.get(call_id, ('', None)))
            if state is None or (name and name != known):
                return self._count_result_locked(ResultDisposition.UNKNOWN_CALL)
            if call is None or state is not _CallState.RUNNING:
                return self._count_result_locked(
                    _DISPOSITION.get(state, ResultDisposition.DUPLICATE))
            self._answer_locked(call, _CallState.DONE, bool(success), content)
            return self._count_result_locked(ResultDisposition.ACCEPTED)

    def confirm(self, request_id: str, call_id: str, approve: bool,
                reason: str) -> tuple[bool, str]:
        """An operator's decision on a held call: ``(accepted, message)``.

        Approve: the call is released (``listener.release``) and, in a running task, waits
        for its result. Deny: the model gets a failed result "denied by operator: <reason>".
        Refused (accepted False) when the call is not held: unknown, already decided, timed
        out, or withdrawn because its task ended.
        """
        with self._lock:
            task = self._tasks.get(request_id)
            call = task.calls.get(call_id) if task is not None else None
            if call is None:
                call = self._held_final.get((request_id, call_id))
            if call is None:
                self._counts['refused_confirmations'] += 1
                return False, self._no_call_message(task, request_id, call_id)
            if call.state is not _CallState.HELD:
                self._counts['refused_confirmations'] += 1
                return False, f'call {call_id!r} of request {request_id!r} is not waiting ' \
                    f'for confirmation: {call.state.value}'
            if call.task is None:
                del self._held_final[(request_id, call_id)]
            if approve:
                self._counts['approved'] += 1
                self._release_locked(call)
                return True, 'approved: the call was released to tool_calls'
            self._counts['denied'] += 1
            text = reason.strip() if isinstance(reason, str) and reason.strip() else \
                'no reason given'
            self._answer_locked(call, _CallState.DENIED, False,
                                f'denied by operator: {text[:self._config.max_result_chars]}')
            return True, 'denied: the call will not be released'

    # -- diagnostics ----------------------------------------------------------------------
    def stats(self) -> TaskStats:
        with self._lock:
            held = sum(t.held for t in self._tasks.values()) + len(self._held_final)
            counts = self._counts
            return TaskStats(
                running=len(self._tasks), held=held, started=counts['started'],
                steps=counts['steps'], finals=dict(self._finals),
                results=dict(self._results), result_timeouts=counts['result_timeouts'],
                approved=counts['approved'], denied=counts['denied'],
                confirmation_timeouts=counts['confirmation_timeouts'],
                withdrawn=counts['withdrawn'],
                refused_confirmations=counts['refused_confirmations'],
                remembered=len(self._finished),
                timers=len(self._timers) - self._cancelled_timers)

    # -- steps ----------------------------------------------------------------------------
    def _submit_step(self, task: _Task) -> None:
        """Submit the task's current step (outside the lock; the engine may answer at once)."""
        step, step_id = task.step, task.step_id
        try:
            prompt = dataclasses.replace(task.prompt, id=step_id, history=task.history)
            self._engine.submit(prompt, lambda outcome: self._step_answered(
                task, step, outcome))
        except Exception as exc:  # Engine.submit never raises; this is for a bug here
            _LOG.exception('task %s: step %d could not be submitted', task.id, step)
            with self._lock:
                self._end_locked(task, self._outcome(
                    task, RequestStatus.ERROR, f'internal error: {type(exc).__name__}: {exc}'))
            return
        with self._lock:
            stop = task.ended or task.cancel_requested
        if stop:  # canceled or stopped while it was being submitted
            self._engine.cancel(step_id)

    def _task_job(self, job: Callable[..., None], task: _Task, *args: Any) -> None:
        """Run one of a task's worker jobs; a bug in it ends the task ERROR, never silently."""
        try:
            job(task, *args)
        except Exception as exc:
            _LOG.exception('task %s: %s failed', task.id, job.__name__)
            with self._lock:
                self._end_locked(task, self._outcome(
                    task, RequestStatus.ERROR, f'internal error: {type(exc).__name__}: {exc}'))

    def _on_step_outcome(self, task: _Task, step: int, outcome: Outcome) -> None:
        """A step's answer (worker thread): final, or out go its calls."""
        with self._lock:
            if task.ended or step != task.step:
                return
            self._counts['steps'] += 1
            outcome = dataclasses.replace(outcome, request_id=task.id)
            if task.cancel_requested and outcome.status is not RequestStatus.CANCELED:
                outcome = dataclasses.replace(outcome, status=RequestStatus.CANCELED,
                                              status_message='canceled by the caller')
            result = outcome.result
            if not outcome.ok or result is None or not result.tool_calls:
                self._end_locked(task, outcome)
                return
            tools = self._renumber_locked(task, result.tool_calls)
            outcome = dataclasses.replace(outcome, result=dataclasses.replace(
                result, tool_calls=list(tools)))
            calls = tuple(self._task_call(task.id, t) for t in tools)
            if step + 1 >= task.max_steps:
                self._end_locked(task, outcome, calls)
                return
            if time.monotonic() >= task.deadline:  # answered in time, but nothing left to wait
                self._end_locked(task, dataclasses.replace(
                    outcome, status=RequestStatus.BUDGET_EXCEEDED,
                    status_message=LATE_STEP_DEADLINE))
                return
            task.assistant = Message('assistant', result.text, tuple(tools))
            task.calls = {c.call_id: _Call(c, task, task.listener) for c in calls}
            task.outstanding = len(calls)
            task.held = sum(c.requires_confirmation for c in calls)
            task.state = (TaskState.WAITING_FOR_CONFIRMATION if task.held
                          else TaskState.WAITING_FOR_RESULTS)
            self._emit(task.listener.step, StepOutcome(outcome, step, False, calls))
            for call in task.calls.values():
                if call.call.requires_confirmation:
                    self._hold_locked(call)
                else:
                    self._release_locked(call)
            self._emit(task.listener.state, step, task.state)
            task.deadline_timer = self._arm_locked(task.deadline - time.monotonic(),
                                                   self._deadline_locked, task)

    def _advance(self, task: _Task) -> None:
        """Every result of the step is in (worker thread): render them and run the next step."""
        with self._lock:
            if task.ended:
                return
            tool_turns = tuple(Message('tool', _result_text(c)) for c in task.calls.values())
            task.history = (*task.history, task.assistant, *tool_turns)
            task.past.update((cid, (c.call.name, c.state)) for cid, c in task.calls.items())
            task.calls, task.assistant = {}, None
            _cancel_timer(self, task.deadline_timer)
            task.deadline_timer = None
            task.step += 1
            task.state = TaskState.GENERATING
            limit = self._config.max_task_tokens
            prompt = dataclasses.replace(task.prompt, id=task.step_id, history=task.history)
        try:
            tokens = self._engine.count_prompt_tokens(prompt)
        except Exception:  # nothing loaded, invalid prompt: the engine's own answer says so
            tokens = 0
        with self._lock:
            if task.ended:
                return
            if task.cancel_requested:
                self._end_locked(task, self._outcome(
                    task, RequestStatus.CANCELED, 'canceled by the caller'))
                return
            if tokens > limit:
                self._end_locked(task, self._outcome(
                    task, RequestStatus.ERROR,
                    f'step {task.step} would need a prompt of {tokens} tokens, more than '
                    f'max_task_tokens ({limit}): the task ends before the context overflows'))
                return
            self._emit(task.listener.state, task.step, TaskState.GENERATING)
        self._submit_step(task)

    # -- calls (all *_locked: called with the lock held) ----------------------------------
    def _renumber_locked(self, task: _Task, tools: list[ToolCall]) -> tuple[ToolCall, ...]:
        first = task.call_count
        task.call_count += len(tools)
        return tuple(ToolCall(id=f'call_{first + i}', name=t.name, arguments=t.arguments)
                     for i, t in enumerate(tools))

    def _task_call(self, task_id: str, tool: ToolCall) -> TaskCall:
        registry = self._engine.tools
        spec = registry.get(tool.name) if registry is not None else None
        # An unknown tool (the registry changed under a running task) is held: never
        # publish what cannot be checked.
        held = spec is None or spec.requires_confirmation
        return TaskCall(request_id=task_id, call_id=tool.id, name=tool.name,
                        arguments_json=tool.arguments_json, requires_confirmation=held)

    def _result_timeout_s(self, name: str) -> float:
        registry = self._engine.tools
        spec = registry.get(name) if registry is not None else None
        if spec is not None and spec.result_timeout_s is not None:
            return spec.result_timeout_s
        return self._config.tool_result_timeout_s

    def _hold_locked(self, call: _Call) -> None:
        call.state = _CallState.HELD
        call.timeout_s = self._config.confirmation_timeout_s
        call.timer = self._arm_locked(call.timeout_s, self._confirmation_timeout_locked, call)
        self._emit(call.listener.pending, call.call)

    def _release_locked(self, call: _Call) -> None:
        """The ONLY place a held call is released (after approval), and where others are."""
        was_held = call.state is _CallState.HELD
        _cancel_timer(self, call.timer)
        call.timer = None
        self._emit(call.listener.release, call.call)
        task = call.task
        if task is None:  # a final step's call: nothing waits for its result
            call.state = _CallState.RELEASED
            return
        call.state = _CallState.RUNNING
        call.timeout_s = self._result_timeout_s(call.call.name)
        call.timer = self._arm_locked(call.timeout_s, self._result_timeout_locked, call)
        if was_held:
            task.held -= 1
            if task.held == 0:
                task.state = TaskState.WAITING_FOR_RESULTS
                self._emit(task.listener.state, task.step, task.state)

    def _answer_locked(self, call: _Call, state: _CallState, success: bool,
                       content: Any) -> None:
        """Record a call's result (real or synthetic); the last one advances the task."""
        was_held = call.state is _CallState.HELD
        _cancel_timer(self, call.timer)
        call.timer = None
        call.state, call.success, call.content = state, success, content
        task = call.task
        if task is None or task.ended:  # a final step's held call: the model is done
            return
        task.outstanding -= 1
        if was_held:
            task.held -= 1
        if task.outstanding == 0:
            self._enqueue_locked(self._task_job, self._advance, task)
        elif was_held and task.held == 0:
            task.state = TaskState.WAITING_FOR_RESULTS
            self._emit(task.listener.state, task.step, task.state)

    def _result_timeout_locked(self, call: _Call) -> None:
        if call.state is not _CallState.RUNNING:
            return
        self._counts['result_timeouts'] += 1
        self._answer_locked(call, _CallState.TIMED_OUT, False,
                            f'no result within {call.timeout_s:g} s')

    def _confirmation_timeout_locked(self, call: _Call) -> None:
        if call.state is not _CallState.HELD:
            return
        self._counts['confirmation_timeouts'] += 1
        if call.task is None:
            self._held_final.pop((call.call.request_id, call.call.call_id), None)
        self._answer_locked(call, _CallState.UNCONFIRMED, False,
                            f'not confirmed within {call.timeout_s:g} s')

    def _deadline_locked(self, task: _Task) -> None:
        if task.ended or task.state is TaskState.GENERATING:
            return
        message = (WAITING_FOR_CONFIRMATION_DEADLINE
                   if task.state is TaskState.WAITING_FOR_CONFIRMATION
                   else WAITING_FOR_RESULTS_DEADLINE)
        self._end_locked(task, self._outcome(task, RequestStatus.BUDGET_EXCEEDED, message))

    def _withdraw_locked(self, call: _Call) -> None:
        _cancel_timer(self, call.timer)
        call.timer = None
        call.state = _CallState.WITHDRAWN
        self._counts['withdrawn'] += 1

    def _end_locked(self, task: _Task, outcome: Outcome,
                    calls: tuple[TaskCall, ...] = ()) -> None:
        """The one way a task ends: one final step, state freed, held calls handled."""
        if task.ended:
            return
        task.ended = True
        if self._tasks.get(task.id) is task:
            del self._tasks[task.id]
        self._finished[task.id] = None
        self._finished.move_to_end(task.id)
        while len(self._finished) > self._config.finished_memory:
            self._finished.popitem(last=False)
        _cancel_timer(self, task.deadline_timer)
        for call in task.calls.values():
            if call.state is _CallState.HELD:
                self._withdraw_locked(call)
            _cancel_timer(self, call.timer)
        task.calls, task.past, task.history, task.assistant = {}, {}, (), None
        self._finals[outcome.status.name] += 1
        # A task that ends between generations answers the step that would have run next.
        step = task.step + (task.state is not TaskState.GENERATING)
        listener = task.listener
        self._emit(listener.step, StepOutcome(outcome, step, True, calls))
        for task_call in calls:
            if task_call.requires_confirmation:
                call = _Call(task_call, None, listener)
                self._held_final[(task.id, task_call.call_id)] = call
                self._hold_locked(call)
            elif task.publish_final_calls:
                self._emit(listener.release, task_call)

    def _outcome(self, task: _Task, status: RequestStatus, message: str) -> Outcome:
        return Outcome(request_id=task.id, status=status, status_message=message,
                       total_s=max(0.0, time.monotonic() - task.arrival))

    def _no_call_message(self, task: Optional[_Task], request_id: str, call_id: str) -> str:
        if task is not None:
            past = task.past.get(call_id)
            if past is not None:
                return f'call {call_id!r} of request {request_id!r} is not waiting for ' \
                    f'confirmation: {past[1].value}'
            return f'request {request_id!r} has no call {call_id!r}'
        if request_id in self._finished:
            return f'{TASK_ENDED}: request {request_id!r} has no call {call_id!r} waiting ' \
                'for confirmation'
        return f'unknown request {request_id!r}'

    def _parse_content(self, content_json: str) -> Any:
        if not isinstance(content_json, str):
            raise ValueError('content_json must be a string')
        if not content_json.strip():
            return None
        if len(content_json) > self._config.max_result_chars:
            raise ValueError('content_json is too long')
        return loads_bounded(content_json, 'content_json')

    def _count_result(self, disposition: ResultDisposition) -> ResultDisposition:
        with self._lock:
            return self._count_result_locked(disposition)

    def _count_result_locked(self, disposition: ResultDisposition) -> ResultDisposition:
        self._results[disposition.value] += 1
        return disposition

    # -- the worker: listener calls and next steps, in decision order ---------------------
    def _emit(self, method: Callable[..., None], *args: Any) -> None:
        """Queue a listener call (lock held): the worker makes it, in this order."""
        self._enqueue_locked(_notify, method, *args)

    def _enqueue_locked(self, fn: Callable[..., None], *args: Any) -> None:
        self._jobs.append((fn, args))
        if not self._running:  # a running runner takes it next
            self._work.notify()

    def _step_answered(self, task: _Task, step: int, outcome: Outcome) -> None:
        """The engine's answer to a step, on the thread that decided it (usually the engine's
        worker, which has just generated it).

        When the manager's worker is idle and nothing else is queued, the decision and the
        listener calls it makes (the step's Action, its calls going out) run right here, in
        order, instead of waking the worker: a thread woken from idle runs the same Python
        several times slower at first, and this is on every step's path. Anything else
        queued meanwhile (a next step to render and submit) is left to the worker.
        """
        job = (self._on_step_outcome, task, step, outcome)
        with self._lock:
            if self._running or self._jobs:  # work in hand: keep the decision order
                self._enqueue_locked(self._task_job, *job)
                return
            self._running = True
        try:
            _run_job(self._task_job, job)
            while True:
                with self._lock:
                    if not self._jobs or self._jobs[0][0] is not _notify:
                        return
                    fn, args = self._jobs.popleft()
                _run_job(fn, args)
        finally:
            with self._lock:
                self._running = False
                self._work.notify()

    def _work_loop(self) -> None:
        while True:
            with self._lock:
                while self._running or (not self._jobs and not self._closed):
                    self._work.wait()
                if not self._jobs:
                    return
                fn, args = self._jobs.popleft()
                self._running = True
            try:
                _run_job(fn, args)
            finally:
                with self._lock:
                    self._running = False

    # -- the timer thread -----------------------------------------------------------------
    def _arm_locked(self, delay_s: float, fn: Callable[..., None], *args: Any) -> _Timer:
        timer = _Timer(time.monotonic() + max(0.0, delay_s), next(self._seq), fn, args)
        heapq.heappush(self._timers, timer)
        if self._timers[0] is timer:
            self._tick.notify()
        return timer

    def _timer_loop(self) -> None:
        with self._lock:
            while not self._closed:
                while self._timers and self._timers[0].cancelled:
                    heapq.heappop(self._timers)
                    self._cancelled_timers -= 1
                if not self._timers:
                    self._tick.wait()
                    continue
                timer = self._timers[0]
                wait = timer.when - time.monotonic()
                if wait > 0:
                    self._tick.wait(wait)
                    continue
                heapq.heappop(self._timers)
                timer.cancelled = True  # spent: a later cancel must not count it
                try:
                    timer.fn(*timer.args)
                except Exception:  # a bug here must not stop every other timeout
                    _LOG.exception('task timer: %s failed', timer.fn.__name__)


def _cancel_timer(manager: TaskManager, timer: Optional[_Timer]) -> None:
    """Cancel a timer (lock held); compact the heap when most of it is cancelled."""
    if timer is None or timer.cancelled:
        return
    timer.cancelled = True
    manager._cancelled_timers += 1
    heap = manager._timers
    if manager._cancelled_timers > 64 and manager._cancelled_timers * 2 > len(heap):
        heap[:] = [t for t in heap if not t.cancelled]
        heapq.heapify(heap)
        manager._cancelled_timers = 0


def _result_text(call: _Call) -> str:
    """A tool turn's content: the call's name, whether it succeeded and what it returned."""
    return json.dumps({'name': call.call.name, 'success': call.success,
                       'content': call.content}, ensure_ascii=False)


def _run_job(fn: Callable[..., None], args: tuple) -> None:
    try:
        fn(*args)
    except Exception:  # a bug here must not stop every other task
        _LOG.exception('task worker: %s failed', getattr(fn, '__name__', fn))


def _notify(method: Callable[..., None], *args: Any) -> None:
    """Call a listener method; its failure is logged, never raised into the manager."""
    try:
        method(*args)
    except Exception:
        _LOG.exception('task listener %s raised', getattr(method, '__name__', method))


class _LogThrottle:
    """At most one log line per key and period, saying how many were suppressed."""

    def __init__(self, period_s: float) -> None:
        self._period_s = period_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter = collections.Counter()

    def log(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self._period_s) < self._period_s:
                self._suppressed[key] += 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += f' ({suppressed} more like it since the last report)'
        _LOG.warning(message, *args)
