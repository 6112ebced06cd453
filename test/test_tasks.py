"""Multi-step tasks at the engine level: steps, tool results, deadlines and the confirmation gate.

Real models through llama.cpp: the tiny random ``nemotron_h`` GGUF (forced to call tools with
``tool_choice`` required) and SmolLM2-135M-Instruct. The engine and the :class:`TaskManager`
are driven directly; a recording :class:`Recorder` stands in for the node (it is the
``TaskListener``) and checks, on every path, that a held call reaches ``release`` only after
the test approved it. The executor is the test itself: it answers released calls through
``TaskManager.tool_result``, at once, late, twice, or never.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml
from conftest import wait_for

from nemotron_ros.engine.config import EngineConfig, TaskConfig
from nemotron_ros.engine.runtime import Engine, Prompt
from nemotron_ros.engine.scheduler import RequestStatus
from nemotron_ros.engine.tasks import (
    WAITING_FOR_RESULTS_DEADLINE,
    ResultDisposition,
    StepOutcome,
    TaskCall,
    TaskManager,
    TaskState,
)
from nemotron_ros.engine.tools import ToolConfigError, ToolRegistry, ToolSpec
from nemotron_ros.engine.types import Message, ToolCall
from nemotron_ros.engine.world_state import Observation

pytest.importorskip('llama_cpp', reason='llama-cpp-python is not installed')

COMMAND = 'Stop the robot, then report back.'
#: stop: a plain tool; scan: a tool with its own short result timeout; dock: held for approval;
#: wait: the plain tool whose call the tiny model writes in the fewest tokens (many-task tests).
TOOLS = {'tools': [
    {'name': 'stop', 'description': 'Stop all motion.'},
    {'name': 'wait', 'description': 'Wait here.'},
    {'name': 'scan', 'description': 'Scan the room with the camera.', 'result_timeout_s': 0.3},
    {'name': 'dock', 'description': 'Drive onto the charging dock.',
     'requires_confirmation': True},
]}
Accepted = ResultDisposition


# -- fixtures ---------------------------------------------------------------------------------
class RecordingEngine(Engine):
    """The real engine, keeping the last prompts it was given so tests can render them."""

    def __init__(self) -> None:
        super().__init__(clock=time.monotonic)
        self.submitted: collections.deque[Prompt] = collections.deque(maxlen=64)

    def submit(self, prompt: Prompt, callback) -> str:
        self.submitted.append(prompt)
        return super().submit(prompt, callback)

    def prompt(self, step_id: str) -> Optional[Prompt]:
        return next((p for p in reversed(self.submitted) if p.id == step_id), None)

    def rendered(self, step_id: str) -> str:
        """The prompt text of step ``step_id`` exactly as the backend renders it."""
        prompt = self.prompt(step_id)
        assert prompt is not None, f'{step_id} was never submitted'
        return self.backend.render(self.prepare(prompt)).text


@pytest.fixture(scope='module')
def tools_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp('task_tools') / 'tools.yaml'
    path.write_text(yaml.safe_dump(TOOLS))
    return str(path)


def _engine(model_path: str, tools_file: str, **extra: Any) -> RecordingEngine:
    engine = RecordingEngine()
    engine.load(EngineConfig(model_path=model_path, tools_file=tools_file, n_threads=1,
                             tool_choice='required', max_tool_calls=1, max_tokens=64,
                             temperature=0.0, queue_size=256, **extra))
    engine.set_active(True)
    return engine


@pytest.fixture(scope='module')
def tiny_engine(tiny_model: str, tools_file: str):
    engine = _engine(tiny_model, tools_file)
    yield engine
    engine.close()


@pytest.fixture(scope='module')
def smol_engine(tools_file: str):
    from nemotron_ros.testing.models import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    engine = _engine(str(path), tools_file)
    yield engine
    engine.close()


@pytest.fixture
def make_manager(tiny_engine):
    managers = []

    def make(engine: Engine = tiny_engine, **config: Any) -> TaskManager:
        manager = TaskManager(engine, TaskConfig(**config))
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.close()


class Recorder:
    """A TaskListener that records every call in order and checks the promises on the fly.

    ``violations`` lists every broken promise: a held call released without the test's
    approval, a second final step, a step or state after the final step.
    """

    def __init__(self, answer: Optional[Callable[[TaskCall], None]] = None) -> None:
        self.events: list[tuple] = []
        self.approved: set[str] = set()
        self.violations: list[str] = []
        self.answer = answer
        self._cv = threading.Condition()

    def _record(self, *event: Any) -> None:
        with self._cv:
            if self.finals and event[0] in ('step', 'state'):
                self.violations.append(f'{event} after the final step')
            self.events.append(event)
            self._cv.notify_all()

    # the TaskListener protocol
    def step(self, step: StepOutcome) -> None:
        self._record('step', step)

    def release(self, call: TaskCall) -> None:
        if call.requires_confirmation and call.call_id not in self.approved:
            self.violations.append(f'held call {call.call_id} released without approval')
        self._record('release', call)
        if self.answer is not None:
            self.answer(call)

    def pending(self, call: TaskCall) -> None:
        self._record('pending', call)

    def state(self, step: int, state: TaskState) -> None:
        self._record('state', step, state)

    # helpers
    def of(self, kind: str) -> list:
        with self._cv:
            return [e[1] if len(e) == 2 else e[1:] for e in self.events if e[0] == kind]

    @property
    def steps(self) -> list[StepOutcome]:
        return self.of('step')

    @property
    def finals(self) -> list[StepOutcome]:
        return [s for s in self.of('step') if s.final]

    @property
    def final(self) -> StepOutcome:
        finals = self.finals
        assert len(finals) == 1, f'{len(finals)} final steps'
        return finals[0]

    @property
    def released(self) -> list[str]:
        return [c.call_id for c in self.of('release')]

    @property
    def pending_calls(self) -> list[TaskCall]:
        return self.of('pending')

    @property
    def states(self) -> list[tuple[int, TaskState]]:
        return self.of('state')

    def wait(self, predicate: Callable[[Recorder], bool], timeout: float = 60.0) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: predicate(self), timeout)

    def wait_final(self, timeout: float = 60.0) -> StepOutcome:
        assert self.wait(lambda r: bool(r.finals), timeout), f'no final step: {self.events}'
        return self.final

    def approve(self, manager: TaskManager, call: TaskCall) -> tuple[bool, str]:
        """Approve through the manager, noting the approval first (release may follow)."""
        self.approved.add(call.call_id)
        accepted, message = manager.confirm(call.request_id, call.call_id, True, '')
        if not accepted:
            self.approved.discard(call.call_id)
        return accepted, message


def instant(manager: TaskManager) -> Callable[[TaskCall], None]:
    """An executor that answers every released call at once, successfully.

    (A final step's calls get answered too, like a real executor would: those results find
    the task finished.)
    """

    def answer(call: TaskCall) -> None:
        content = json.dumps({'note': f'result-of-{call.call_id}'})
        manager.tool_result(call.request_id, call.call_id, call.name, True, content)

    return answer


def _prompt(task_id: str, tool: str, **extra: Any) -> Prompt:
    return Prompt(text=COMMAND, id=task_id, allowed_tools=(tool,), budget_ms=120_000, **extra)


# -- steps and the conversation -------------------------------------------------------------
def test_a_step_answer_is_handled_on_the_thread_that_generated_it(make_manager) -> None:
    # With the task worker idle, a step's decision and the listener calls it causes run on
    # the engine's worker, which has just generated the step, instead of waking the task
    # worker (a thread woken from idle runs slower at first; this is on every step's path).
    manager = make_manager()
    threads: list[str] = []
    recorder = Recorder(answer=lambda call: threads.append(threading.current_thread().name))
    manager.start(_prompt('on-the-spot', 'stop'), 1, recorder, publish_final_calls=True)
    assert recorder.wait_final().outcome.ok
    assert threads == ['scheduler-worker']


@pytest.mark.parametrize('model', ['tiny', 'smollm2'])
def test_a_task_runs_step_by_step_with_each_result_in_the_next_prompt(request, model) -> None:
    engine = request.getfixturevalue('tiny_engine' if model == 'tiny' else 'smol_engine')
    max_steps = 4 if model == 'tiny' else 3
    manager = request.getfixturevalue('make_manager')(engine)
    recorder = Recorder()
    recorder.answer = instant(manager)
    task = f'three-{model}'
    assert manager.start(_prompt(task, 'stop'), max_steps, recorder,
                         publish_final_calls=True) == task
    final = recorder.wait_final(120.0)

    steps = recorder.steps
    assert [(s.step, s.final) for s in steps] == \
        [(k, k == max_steps - 1) for k in range(max_steps)]
    assert final is steps[-1] and final.outcome.ok, final.outcome.status_message
    ids = [f'call_{k}' for k in range(max_steps)]
    for k, step in enumerate(steps):
        assert step.outcome.request_id == task and step.outcome.ok
        assert [(c.request_id, c.call_id, c.name) for c in step.calls] == [(task, ids[k], 'stop')]
        assert [c.id for c in step.outcome.result.tool_calls] == [ids[k]]
    # Every call went out once, the final step's too (a topic command publishes them).
    assert recorder.released == ids
    assert recorder.states == [(k // 2, (TaskState.GENERATING, TaskState.WAITING_FOR_RESULTS)[
        k % 2]) for k in range(2 * max_steps - 1)]

    first_usage = steps[0].outcome.result.usage
    for k in range(1, max_steps):
        text = engine.rendered(f'{task}#{k}')
        # The conversation so far, in order: the command, then each call and its result.
        position = text.index(COMMAND)
        for j in range(k):
            position = text.index('<function=stop>', position)
            position = text.index('<tool_response>', position)
            position = text.index(f'result-of-call_{j}', position)
        assert text.count('<tool_response>') == k
        assert '"success": true' in text
        usage = steps[k].outcome.result.usage
        before = steps[k - 1].outcome.result.usage
        assert usage.prompt_tokens > before.prompt_tokens
        if model == 'smollm2':
            # The step continues the state the last one left: at least its whole prompt is
            # kept (and the answer, up to where the rendered turn differs from it), so only
            # the new turns are evaluated.
            assert usage.prompt_tokens_reused >= before.prompt_tokens, (usage, before)
        else:
            # A recurrent state is only continued when the answer was token for token the
            # turn the next prompt renders; the random model spells <tool_call> out in
            # characters, so each step starts from the fixed prefix's state.
            assert usage.prompt_tokens_reused == first_usage.prompt_tokens_reused > 0
    stats = manager.stats()
    assert (stats.running, stats.held, stats.steps) == (0, 0, max_steps)
    assert recorder.violations == []


def test_one_step_is_todays_request_and_final_calls_follow_publish_final_calls(
        make_manager) -> None:
    manager = make_manager()
    for publish in (True, False):
        recorder = Recorder()
        manager.start(_prompt(f'one-{publish}', 'stop'), 0, recorder,
                      publish_final_calls=publish)
        final = recorder.wait_final()
        assert (final.step, final.final, final.outcome.ok) == (0, True, True)
        assert [c.call_id for c in final.calls] == ['call_0']
        assert recorder.released == (['call_0'] if publish else [])
        assert recorder.states == [(0, TaskState.GENERATING)]


def test_max_steps_reached_ends_with_the_last_steps_calls(make_manager) -> None:
    manager = make_manager(max_steps=2)
    recorder = Recorder()
    recorder.answer = instant(manager)
    manager.start(_prompt('two', 'stop'), 0, recorder, publish_final_calls=False)
    final = recorder.wait_final()
    assert (final.step, final.outcome.status) == (1, RequestStatus.OK)
    assert [c.call_id for c in final.calls] == ['call_1']
    assert recorder.released == ['call_0'], 'plan and execute get final calls back instead'


# -- results: timeouts, late, duplicate, unknown, invalid -----------------------------------
def test_a_missing_result_becomes_a_failed_result_and_a_late_one_is_dropped(
        tiny_engine, make_manager) -> None:
    manager = make_manager()
    recorder = Recorder()  # an executor that never answers
    manager.start(_prompt('slow', 'scan'), 8, recorder, publish_final_calls=False)
    # scan's result_timeout_s is 0.3: step 1 runs with a failed result for call_0.
    assert recorder.wait(lambda r: (1, TaskState.GENERATING) in r.states)
    text = tiny_engine.rendered('slow#1')
    assert '{"name": "scan", "success": false, "content": "no result within 0.3 s"}' in text
    assert manager.tool_result('slow', 'call_0', 'scan', True, '{}') is Accepted.LATE
    assert manager.cancel('slow')
    assert recorder.wait_final().outcome.status is RequestStatus.CANCELED
    assert manager.tool_result('slow', 'call_0', 'scan', True, '{}') is \
        Accepted.FINISHED_TASK
    stats = manager.stats()
    assert stats.result_timeouts >= 1
    assert stats.results['late'] == 1 and stats.results['finished_task'] == 1
    assert stats.dropped_results == 2


def test_duplicate_unknown_and_invalid_results_are_dropped_and_counted(
        tiny_engine, make_manager) -> None:
    manager = make_manager()
    recorder = Recorder()
    manager.start(_prompt('dispo', 'stop'), 3, recorder, publish_final_calls=False)
    assert recorder.wait(lambda r: r.released == ['call_0'])
    result = manager.tool_result
    deepest = '[' * 32 + ']' * 32
    assert result('dispo', 'call_0', 'stop', True, 'not json') is Accepted.INVALID_CONTENT
    assert result('dispo', 'call_0', 'stop', True, '[' + deepest + ']') is \
        Accepted.INVALID_CONTENT
    assert result('dispo', 'call_0', 'dock', True, '{}') is Accepted.UNKNOWN_CALL
    assert result('dispo', 'call_7', 'stop', True, '{}') is Accepted.UNKNOWN_CALL
    assert result('nobody', 'call_0', 'stop', True, '{}') is Accepted.UNKNOWN_TASK
    assert result('dispo', 'call_0', 'stop', True, deepest) is Accepted.ACCEPTED
    assert result('dispo', 'call_0', 'stop', True, '{}') is Accepted.DUPLICATE
    assert result('dispo', 'call_0', '', False, '') is Accepted.DUPLICATE
    # The task waits for call_1 now; the dropped results changed nothing.
    assert recorder.wait(lambda r: r.released == ['call_0', 'call_1'])
    assert deepest in tiny_engine.rendered('dispo#1')
    assert result('dispo', 'call_1', 'stop', False, '') is Accepted.ACCEPTED
    final = recorder.wait_final()
    assert (final.step, final.outcome.status) == (2, RequestStatus.OK)
    assert '{"name": "stop", "success": false, "content": null}' in \
        tiny_engine.rendered('dispo#2')
    assert result('dispo', 'call_1', 'stop', True, '{}') is Accepted.FINISHED_TASK
    assert manager.stats().results == {
        'invalid_content': 2, 'unknown_call': 2, 'unknown_task': 1, 'accepted': 2,
        'duplicate': 2, 'finished_task': 1}


# -- the confirmation gate ------------------------------------------------------------------
def test_an_approved_call_is_released_then_its_result_flows(tiny_engine, make_manager) -> None:
    manager = make_manager()
    recorder = Recorder()
    recorder.answer = instant(manager)
    manager.start(_prompt('approve', 'dock'), 2, recorder, publish_final_calls=True)
    assert recorder.wait(lambda r: [c.call_id for c in r.pending_calls] == ['call_0'])
    held = recorder.pending_calls[0]
    assert held.requires_confirmation and recorder.steps[0].calls == (held,)
    assert recorder.wait(lambda r: (0, TaskState.WAITING_FOR_CONFIRMATION) in r.states)
    assert manager.tool_result('approve', 'call_0', 'dock', True, '{}') is \
        Accepted.NOT_RELEASED, 'no executor can have a held call'
    assert recorder.released == []
    assert recorder.approve(manager, held)[0]
    # The final step (max_steps 2) holds its call too: announced after the final step.
    assert recorder.wait(lambda r: len(r.pending_calls) == 2)
    final = recorder.final
    assert (final.step, final.outcome.ok) == (1, True)
    assert recorder.released == ['call_0']
    assert 'result-of-call_0' in tiny_engine.rendered('approve#1')
    assert recorder.states == [(0, TaskState.GENERATING), (0, TaskState.WAITING_FOR_CONFIRMATION),
                               (0, TaskState.WAITING_FOR_RESULTS), (1, TaskState.GENERATING)]
    assert manager.stats().held == 1
    # Still confirmable after the final answer, released once, then no longer held.
    late_held = recorder.pending_calls[1]
    assert recorder.approve(manager, late_held)[0]
    assert recorder.wait(lambda r: r.released == ['call_0', 'call_1'])
    accepted, message = manager.confirm('approve', 'call_1', True, '')
    assert not accepted and 'waiting for confirmation' in message, message
    assert manager.stats().held == 0 and manager.stats().approved == 2
    assert recorder.violations == []


@pytest.mark.parametrize('publish', [True, False])
def test_a_held_call_of_a_final_step_is_released_only_on_approval(make_manager,
                                                                   publish: bool) -> None:
    manager = make_manager()
    recorder = Recorder()
    manager.start(_prompt(f'final-held-{publish}', 'dock'), 1, recorder,
                  publish_final_calls=publish)
    assert recorder.wait(lambda r: len(r.pending_calls) == 1)
    assert recorder.final.calls[0].requires_confirmation
    assert recorder.released == []
    assert recorder.approve(manager, recorder.pending_calls[0])[0]
    assert recorder.wait(lambda r: r.released == ['call_0'])
    assert recorder.violations == []


def test_a_denied_call_is_never_released_and_the_model_sees_the_denial(
        tiny_engine, make_manager) -> None:
    manager = make_manager()
    recorder = Recorder()
    manager.start(_prompt('deny', 'dock'), 2, recorder, publish_final_calls=True)
    assert recorder.wait(lambda r: len(r.pending_calls) == 1)
    assert manager.confirm('deny', 'call_0', False, 'too close to people') == \
        (True, 'denied: the call will not be released')
    assert manager.tool_result('deny', 'call_0', 'dock', True, '{}') in (
        Accepted.NOT_RELEASED, Accepted.FINISHED_TASK)
    final = recorder.wait_final()
    assert final.step == 1
    assert '"content": "denied by operator: too close to people"' in \
        tiny_engine.rendered('deny#1')
    accepted, message = manager.confirm('deny', 'call_0', True, '')
    assert not accepted
    assert recorder.released == [] and recorder.violations == []
    assert manager.stats().denied == 1


def test_no_decision_in_time_is_a_failed_result_and_never_a_release(
        tiny_engine, make_manager) -> None:
    manager = make_manager(confirmation_timeout_s=0.3)
    recorder = Recorder()
    manager.start(_prompt('undecided', 'dock'), 2, recorder, publish_final_calls=True)
    final = recorder.wait_final()
    assert final.step == 1
    assert '"content": "not confirmed within 0.3 s"' in tiny_engine.rendered('undecided#1')
    # The final step's held call times out too; neither can be approved any more.
    assert recorder.wait(lambda r: len(r.pending_calls) == 2)
    assert wait_for(lambda: manager.stats().confirmation_timeouts == 2)
    for call in recorder.pending_calls:
        accepted, message = recorder.approve(manager, call)
        assert not accepted, message
    assert recorder.released == [] and recorder.violations == []
    assert manager.stats().held == 0


@pytest.mark.parametrize('how', ['cancel', 'stop_all'])
def test_a_task_ended_while_held_withdraws_the_call(make_manager, how: str) -> None:
    manager = make_manager()
    recorder = Recorder()
    manager.start(_prompt(f'held-{how}', 'dock'), 3, recorder, publish_final_calls=True)
    assert recorder.wait(lambda r: (0, TaskState.WAITING_FOR_CONFIRMATION) in r.states)
    if how == 'cancel':
        assert manager.cancel(f'held-{how}')
        status = RequestStatus.CANCELED
    else:
        manager.stop_all(RequestStatus.INACTIVE, 'node deactivated')
        status = RequestStatus.INACTIVE
    final = recorder.wait_final()
    assert (final.step, final.outcome.status) == (1, status)
    if how == 'stop_all':
        assert final.outcome.status_message == 'node deactivated'
    else:
        assert 'waiting for confirmation' in final.outcome.status_message
    accepted, message = recorder.approve(manager, recorder.pending_calls[0])
    assert not accepted and 'task ended' in message
    assert recorder.released == [] and recorder.violations == []
    stats = manager.stats()
    assert (stats.held, stats.withdrawn, stats.running) == (0, 1, 0)


def test_stop_all_withdraws_the_held_calls_of_final_steps(make_manager) -> None:
    manager = make_manager()
    recorder = Recorder()
    manager.start(_prompt('final-withdrawn', 'dock'), 1, recorder, publish_final_calls=True)
    assert recorder.wait(lambda r: len(r.pending_calls) == 1)
    manager.stop_all(RequestStatus.INACTIVE, 'node deactivated')
    accepted, _ = recorder.approve(manager, recorder.pending_calls[0])
    assert not accepted
    assert recorder.released == [] and recorder.violations == []
    assert len(recorder.finals) == 1, 'an ended task is not ended again'


# -- cancel, budget, token limit ------------------------------------------------------------
def test_cancel_while_generating_ends_the_task_once(make_manager) -> None:
    manager = make_manager()
    recorder = Recorder()
    generating, gate = threading.Event(), threading.Event()

    def hold(_: str) -> None:  # keeps the step generating until the test has canceled it
        generating.set()
        gate.wait(30.0)

    manager.start(_prompt('cancel-gen', 'stop', on_token=hold), 3, recorder,
                  publish_final_calls=True)
    try:
        assert generating.wait(30.0)
        assert manager.cancel('cancel-gen')
        final = recorder.wait_final()
    finally:
        gate.set()
    assert (final.step, final.outcome.status) == (0, RequestStatus.CANCELED)
    assert not manager.cancel('cancel-gen')
    assert recorder.released == [] and recorder.states == [(0, TaskState.GENERATING)]


def test_cancel_while_waiting_for_results_ends_the_task_at_once(make_manager) -> None:
    manager = make_manager()
    recorder = Recorder()
    manager.start(_prompt('cancel-wait', 'stop'), 3, recorder, publish_final_calls=True)
    assert recorder.wait(lambda r: (0, TaskState.WAITING_FOR_RESULTS) in r.states)
    assert manager.cancel('cancel-wait')
    final = recorder.wait_final()
    assert (final.step, final.outcome.status) == (1, RequestStatus.CANCELED)
    assert 'waiting for tool results' in final.outcome.status_message
    assert manager.tool_result('cancel-wait', 'call_0', 'stop', True, '') is \
        Accepted.FINISHED_TASK
    assert not manager.cancel('cancel-wait') and not manager.cancel('never-started')


def test_the_deadline_bounds_the_wait_for_results(make_manager) -> None:
    manager = make_manager()  # result timeouts (30 s) outlast the 3 s budget
    recorder = Recorder()
    manager.start(Prompt(text=COMMAND, id='deadline', allowed_tools=('stop',), budget_ms=3000),
                  3, recorder, publish_final_calls=True)
    final = recorder.wait_final(30.0)
    assert recorder.steps[0].outcome.ok, recorder.steps[0].outcome.status_message
    assert (final.step, final.outcome.status) == (1, RequestStatus.BUDGET_EXCEEDED)
    assert final.outcome.status_message == WAITING_FOR_RESULTS_DEADLINE


def test_a_task_that_would_outgrow_max_task_tokens_ends_with_error(
        tiny_engine, make_manager) -> None:
    first = tiny_engine.count_prompt_tokens(_prompt('x', 'stop'))
    manager = make_manager(max_task_tokens=first + 2)
    recorder = Recorder()
    recorder.answer = instant(manager)
    manager.start(_prompt('too-long', 'stop'), 3, recorder, publish_final_calls=True)
    final = recorder.wait_final()
    assert (final.step, final.outcome.status) == (1, RequestStatus.ERROR)
    assert f'more than max_task_tokens ({first + 2})' in final.outcome.status_message
    assert tiny_engine.prompt('too-long#1') is None, 'the step never ran'


# -- requests the manager refuses -----------------------------------------------------------
def test_bad_max_steps_a_running_id_and_a_closed_manager_are_answered(make_manager) -> None:
    manager = make_manager()
    refused = Recorder()
    manager.start(_prompt('steps', 'stop'), 65, refused, publish_final_calls=True)
    final = refused.wait_final()
    assert final.outcome.status is RequestStatus.INVALID_REQUEST
    assert 'max_steps must be in [0, 64]' in final.outcome.status_message

    running, twin = Recorder(), Recorder()
    manager.start(_prompt('twin', 'stop'), 3, running, publish_final_calls=True)
    manager.start(_prompt('twin', 'stop'), 3, twin, publish_final_calls=True)
    assert "'twin' is already running" in twin.wait_final().outcome.status_message
    assert running.wait(lambda r: bool(r.released)) and not running.finals
    manager.close()
    assert running.final.outcome.status is RequestStatus.INACTIVE
    late = Recorder()
    manager.start(_prompt('after-close', 'stop'), 1, late, publish_final_calls=True)
    assert late.final.outcome.status is RequestStatus.INACTIVE, 'answered before start returns'


# -- many tasks -----------------------------------------------------------------------------
def test_exactly_one_final_per_task_under_a_flood(make_manager) -> None:
    manager = make_manager()
    tasks = 40
    calls: queue.Queue = queue.Queue()
    recorders = {f'flood-{i}': Recorder(answer=calls.put) for i in range(tasks)}
    stop = threading.Event()

    def executor(seed: int) -> None:  # answers in random order, sometimes twice or wrongly
        rng = random.Random(seed)
        while not stop.is_set():
            batch = []
            try:
                batch.append(calls.get(timeout=0.05))
                while len(batch) < 4:
                    batch.append(calls.get_nowait())
            except queue.Empty:
                pass
            rng.shuffle(batch)
            for call in batch:
                manager.tool_result(call.request_id, call.call_id, call.name, True, '{}')
                if rng.random() < 0.3:
                    manager.tool_result(call.request_id, call.call_id, call.name, True, '{}')
                if rng.random() < 0.2:
                    manager.tool_result(call.request_id, 'call_99', call.name, True, '{}')

    def starter(ids: list[str]) -> None:
        for task_id in ids:
            manager.start(_prompt(task_id, 'wait'), 3, recorders[task_id],
                          publish_final_calls=True)

    ids = list(recorders)
    threads = [threading.Thread(target=executor, args=(seed,)) for seed in range(3)]
    threads += [threading.Thread(target=starter, args=(ids[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        assert wait_for(lambda: all(r.finals for r in recorders.values()), 120.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    for task_id, recorder in recorders.items():
        final = recorder.final
        assert final.outcome.request_id == task_id
        assert (final.step, final.outcome.status) == (2, RequestStatus.OK), \
            final.outcome.status_message
        assert [s.step for s in recorder.steps] == [0, 1, 2]
        assert recorder.released == ['call_0', 'call_1', 'call_2']
        assert recorder.violations == []
    stats = manager.stats()
    assert (stats.running, stats.held, stats.timers) == (0, 0, 0)
    assert stats.finals == {'OK': tasks} and stats.results['accepted'] == 2 * tasks


def _rss_bytes() -> int:
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class _Counting:
    """The lightest listener: answers at once, counts finals (the test must not grow)."""

    def __init__(self, manager: TaskManager, done: threading.Semaphore,
                 finals: collections.Counter) -> None:
        self.manager, self.done, self.finals = manager, done, finals

    def step(self, step: StepOutcome) -> None:
        if step.final:
            self.finals[(step.step, step.outcome.status.name)] += 1
            self.done.release()

    def release(self, call: TaskCall) -> None:
        self.manager.tool_result(call.request_id, call.call_id, call.name, True, '{"ok":1}')

    def pending(self, call: TaskCall) -> None:
        raise AssertionError('no held calls here')

    def state(self, step: int, state: TaskState) -> None:
        pass


@pytest.mark.slow
def test_a_thousand_tasks_leave_no_state_behind(make_manager) -> None:
    manager = make_manager(max_steps=2, finished_memory=256)
    in_flight = 4
    slots = threading.Semaphore(in_flight)
    finals: collections.Counter = collections.Counter()

    def run(count: int, prefix: str) -> None:
        for index in range(count):
            slots.acquire()
            manager.start(_prompt(f'{prefix}-{index}', 'wait'), 0,
                          _Counting(manager, slots, finals), publish_final_calls=False)
        for _ in range(in_flight):  # every started task has ended
            assert slots.acquire(timeout=60.0)
        for _ in range(in_flight):
            slots.release()

    run(100, 'warm')
    gc.collect()
    before = _rss_bytes()
    run(1000, 'task')
    gc.collect()
    after = _rss_bytes()
    assert finals == {(1, 'OK'): 1100}, finals
    stats = manager.stats()
    assert (stats.running, stats.held, stats.timers) == (0, 0, 0)
    assert stats.remembered == 256, 'finished ids are remembered, boundedly'
    assert stats.results == {'accepted': 1100}
    assert after / before <= 1.05, f'RSS grew from {before >> 20} MiB to {after >> 20} MiB'


# -- pieces: prompts with history, the tool file, the settings ------------------------------
def test_history_follows_the_first_user_turn_and_the_world_state_stays_in_it(
        tiny_model: str, tools_file: str) -> None:
    engine = Engine(clock=time.monotonic)
    engine.load(EngineConfig(model_path=tiny_model, tools_file=tools_file, warm_up=False))
    try:
        engine.observe(Observation(source='camera', label='red_cup', stamp=time.monotonic(),
                                   ttl_s=60.0))
        history = (Message('assistant', '', (ToolCall('call_0', 'stop', {}),)),
                   Message('tool', '{"name": "stop", "success": true, "content": null}'))
        request = engine.prepare(Prompt(text=COMMAND, history=history))
        assert [m.role for m in request.messages] == ['system', 'user', 'assistant', 'tool']
        assert 'red_cup' in request.messages[1].content
        assert request.messages[1].content.endswith(COMMAND)
        assert tuple(request.messages[2:]) == history
        with pytest.raises(ValueError, match='a system turn can only come first'):
            engine.prepare(Prompt(text=COMMAND, history=(Message('system', 'obey'),)))
        without = engine.count_prompt_tokens(Prompt(text=COMMAND))
        assert engine.count_prompt_tokens(Prompt(text=COMMAND, history=history)) > without
    finally:
        engine.close()


@pytest.mark.parametrize('value', [0, -1, 3601, float('nan'), True, 'soon'])
def test_a_bad_result_timeout_in_the_tool_file_is_refused_naming_the_tool(value) -> None:
    data = {'tools': [{'name': 'navigate_to', 'description': 'Drive.',
                       'result_timeout_s': value}]}
    with pytest.raises(ToolConfigError, match=r"tool 'navigate_to': 'result_timeout_s' must be "
                                              r'a number of seconds in \(0, 3600\]'):
        ToolRegistry.from_dict(data, source='tools.yaml')
    with pytest.raises(ToolConfigError, match="tool 'go'"):
        ToolRegistry([ToolSpec('go', 'Drive.', result_timeout_s=-2.0)])


def test_result_timeouts_of_the_example_tool_file() -> None:
    root = Path(__file__).resolve().parents[1]
    registry = ToolRegistry.from_yaml(root / 'config' / 'tools.example.yaml')
    assert registry.get('navigate_to').result_timeout_s == 120.0
    assert registry.get('pick').result_timeout_s is None
    assert any(tool.requires_confirmation for tool in registry)


def test_the_task_settings_come_from_the_engine_config() -> None:
    config = EngineConfig(max_steps=4, tool_result_timeout_ms=1500,
                          confirmation_timeout_ms=20000, max_task_tokens=2000)
    assert config.task_config() == TaskConfig(
        max_steps=4, tool_result_timeout_s=1.5, confirmation_timeout_s=20.0,
        max_task_tokens=2000, max_result_chars=config.max_input_chars)
    # The context must still hold a full answer after the task's prompt.
    assert EngineConfig(n_ctx=2048, max_tokens=256).task_config().max_task_tokens == 1792
    with pytest.raises(ValueError, match=r'max_steps must be in \[1, 64\], got 0'):
        EngineConfig(max_steps=0)
    with pytest.raises(ValueError, match=r'tool_result_timeout_ms must be in \[1, 3600000\]'):
        EngineConfig(tool_result_timeout_ms=0)
    with pytest.raises(ValueError, match=r'confirmation_timeout_s must be in \[0.001, 3600\]'):
        TaskConfig(confirmation_timeout_s=0.0)
