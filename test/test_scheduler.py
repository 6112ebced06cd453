"""Scheduler contract tests: every request answered exactly once, never late as OK.

The pure-logic tests run against ``SleepBackend``, a deterministic stand-in that sleeps per
token and honours deadline and cancel like a real backend, so the scheduler's ordering and
status decisions can be checked without a model. Assertions are on statuses and ordering, not
on tight timings, because the CI machines are shared.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Optional

import pytest

from nemotron_ros.engine.backends import Backend, ModelGuard, ModelInfo
from nemotron_ros.engine.estimator import EstimatorConfig
from nemotron_ros.engine.scheduler import (
    Outcome,
    RequestKind,
    RequestStatus,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
)
from nemotron_ros.engine.tools import ToolRegistry
from nemotron_ros.engine.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Message,
    SamplingParams,
    ToolCall,
    ToolChoice,
    Usage,
)

DECODE_S = 0.005
PREFILL_TOKENS_PER_S = 20000.0


class SleepBackend(Backend):
    """Sleeps ``DECODE_S`` per token; honours deadline and cancel between tokens.

    The user message is the request's tag: ``answers`` maps tags to answer lengths, tags in
    ``fail`` raise, ``stalls`` adds an unforeseeable pause to the prefill, tags starting with
    ``stubborn`` ignore deadline and cancel. ``calls`` and ``rejected`` give a tag's answer
    valid tool calls and dropped ones (as ``Backend.finish`` reports them).
    """

    def __init__(self, default_tokens: int = 4) -> None:
        super().__init__(ToolRegistry())
        self.default_tokens = default_tokens
        self.answers: dict[str, int] = {}
        self.fail: set[str] = set()
        self.stalls: dict[str, float] = {}
        self.calls: dict[str, list[ToolCall]] = {}
        self.rejected: dict[str, list[str]] = {}
        self.started: list[str] = []
        self.max_tokens_seen: dict[str, int] = {}
        self.max_concurrent = 0
        self._running = 0
        self._cv = threading.Condition()

    def load(self, cancel=None) -> ModelInfo:
        return ModelInfo('sleep', 'sleep', 'none', 4096, 100, False)

    def unload(self) -> None:
        pass

    @property
    def loaded(self) -> bool:
        return True

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def wait_started(self, tag: str, timeout: float = 5.0) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: tag in self.started, timeout), f'{tag} never ran'

    def generate(self, request: GenerationRequest) -> GenerationResult:
        tag = request.messages[-1].content
        with self._cv:
            self._running += 1
            self.max_concurrent = max(self.max_concurrent, self._running)
            self.started.append(tag)
            self.max_tokens_seen[tag] = request.sampling.max_tokens
            self._cv.notify_all()
        try:
            return self._generate(tag, request)
        finally:
            with self._cv:
                self._running -= 1

    def _generate(self, tag: str, request: GenerationRequest) -> GenerationResult:
        if tag in self.fail:
            raise RuntimeError(f'simulated fault on {tag}')
        start = time.monotonic()
        prompt = self.count_tokens('\n'.join(m.content for m in request.messages))
        time.sleep(prompt / PREFILL_TOKENS_PER_S + self.stalls.get(tag, 0.0))
        usage = Usage(prompt_tokens=prompt, prefill_s=time.monotonic() - start)
        usage.time_to_first_token_s = usage.prefill_s
        wanted = self.answers.get(tag, self.default_tokens)
        reason = FinishReason.STOP
        for index in range(wanted):
            stop = self._stop_reason(tag, request)
            if stop is not None:
                reason = stop
                break
            if index >= request.sampling.max_tokens:
                reason = FinishReason.LENGTH
                break
            time.sleep(DECODE_S)
            usage.completion_tokens += 1
        usage.total_s = time.monotonic() - start
        usage.decode_s = max(0.0, usage.total_s - usage.prefill_s - DECODE_S)
        text = 'ok ' * usage.completion_tokens if reason is FinishReason.STOP else ''
        calls = list(self.calls.get(tag, [])) if reason is FinishReason.STOP else []
        return GenerationResult(text=text, finish_reason=reason, usage=usage, tool_calls=calls,
                                rejected=list(self.rejected.get(tag, [])))

    @staticmethod
    def _stop_reason(tag: str, request: GenerationRequest) -> Optional[FinishReason]:
        stubborn = tag.startswith('stubborn')
        if request.cancel is not None and request.cancel.cancelled and not stubborn:
            return request.cancel.reason
        if request.deadline is not None and time.monotonic() >= request.deadline \
                and not stubborn:
            return FinishReason.DEADLINE
        return None


def _config(**overrides) -> SchedulerConfig:
    estimator = EstimatorConfig(prefill_tokens_per_s=PREFILL_TOKENS_PER_S,
                                decode_tokens_per_s=1.0 / DECODE_S, overhead_s=0.001,
                                completion_tokens=4)
    values = dict(max_queue=8, min_new_tokens=2, estimator=estimator)
    values.update(overrides)
    return SchedulerConfig(**values)


def _request(tag: str, budget_s: float = 5.0, priority: int = 0,
             kind: RequestKind = RequestKind.TOPIC, max_tokens: int = 256,
             request_id: str = '', tool_choice: ToolChoice = ToolChoice.AUTO
             ) -> ScheduledRequest:
    generation = GenerationRequest(
        messages=[Message('system', 'You are a robot.'), Message('user', tag)],
        sampling=SamplingParams(max_tokens=max_tokens), tool_choice=tool_choice)
    return ScheduledRequest(payload=generation, id=request_id or tag, budget_s=budget_s,
                            priority=priority, kind=kind)


@pytest.fixture
def backend() -> SleepBackend:
    return SleepBackend()


@pytest.fixture
def make_scheduler(backend):
    made: list[Scheduler] = []

    def make(**overrides) -> Scheduler:
        scheduler = Scheduler(backend, _config(**overrides))
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        assert scheduler.shutdown(timeout=5.0)


def test_feasible_budget_is_met(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['hello'] = 10
    outcome = scheduler.submit(_request('hello', budget_s=2.0)).result(timeout=5)
    assert outcome.status is RequestStatus.OK, outcome.status_message
    assert outcome.result.usage.completion_tokens == 10
    assert outcome.total_s <= 2.0
    assert outcome.estimate is not None and outcome.estimate.total_s < 2.0


def test_impossible_budget_is_rejected_at_once_without_running(make_scheduler, backend):
    scheduler = make_scheduler()
    long_prompt = ' '.join(['word'] * 2000)
    handle = scheduler.submit(_request(long_prompt, budget_s=0.001))
    assert handle.done(), 'the rejection must be decided inside submit()'
    outcome = handle.result(timeout=0)
    assert outcome.status is RequestStatus.REJECTED_BUDGET
    assert 'estimate' in outcome.status_message and 'prefill' in outcome.status_message
    assert outcome.estimate.total_s > 0.001
    assert backend.started == []


def test_budget_caps_max_tokens_and_cut_answer_is_budget_exceeded(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['ramble'] = 10_000
    outcome = scheduler.submit(_request('ramble', budget_s=0.3, max_tokens=5000)).result(5)
    assert outcome.status is RequestStatus.BUDGET_EXCEEDED, outcome.status_message
    assert 2 <= backend.max_tokens_seen['ramble'] < 0.3 / DECODE_S
    assert outcome.max_tokens == backend.max_tokens_seen['ramble']
    assert outcome.total_s < 1.0


def test_own_max_tokens_limit_is_ok(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['short'] = 100
    outcome = scheduler.submit(_request('short', budget_s=5.0, max_tokens=3)).result(5)
    assert outcome.status is RequestStatus.OK
    assert outcome.result.finish_reason is FinishReason.LENGTH
    assert outcome.max_tokens == 3


def test_flood_from_many_threads_answers_each_request_exactly_once(make_scheduler, backend):
    scheduler = make_scheduler(max_queue=4)
    backend.default_tokens = 4
    calls: Counter = Counter()
    outcomes: dict[str, Outcome] = {}
    lock = threading.Lock()
    handles = []

    def record(outcome: Outcome) -> None:
        with lock:
            calls[outcome.request_id] += 1
            outcomes[outcome.request_id] = outcome

    def client(index: int) -> None:
        for n in range(30):
            kind = (RequestKind.TOPIC, RequestKind.SERVICE)[n % 2]
            request = _request(f'c{index}-{n}', budget_s=(0.02, 0.2, 2.0)[n % 3],
                               priority=n % 4, kind=kind)
            handle = scheduler.submit(request, callback=record)
            with lock:
                handles.append((request, handle))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for request, handle in handles:
        outcome = handle.result(timeout=10)
        assert outcome.request_id == request.id
        if outcome.status is RequestStatus.OK:
            assert outcome.total_s <= request.budget_s + 1e-9
    assert len(handles) == 180
    assert set(calls) == {r.id for r, _ in handles}
    assert set(calls.values()) == {1}
    stats = scheduler.stats()
    assert stats.submitted == stats.answered == 180
    assert stats.queue_depth == 0 and stats.running is None
    statuses = Counter(o.status for o in outcomes.values())
    assert statuses[RequestStatus.REJECTED_BUSY] > 0
    assert statuses[RequestStatus.OK] > 0
    assert backend.max_concurrent == 1


def test_service_preempts_running_lower_priority_topic(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['chatter'] = 2000
    low = scheduler.submit(_request('chatter', budget_s=30.0, priority=0))
    backend.wait_started('chatter')
    high = scheduler.submit(_request('plan', budget_s=5.0, priority=5,
                                     kind=RequestKind.SERVICE))
    assert low.result(timeout=5).status is RequestStatus.PREEMPTED
    assert 'plan' in low.result().status_message
    assert high.result(timeout=5).status is RequestStatus.OK
    assert backend.started == ['chatter', 'plan']


@pytest.mark.parametrize('kind, priority, preempt_kinds', [
    (RequestKind.TOPIC, 5, None),
    (RequestKind.SERVICE, 0, None),
    (RequestKind.SERVICE, 5, frozenset()),
])
def test_no_preemption_without_rule(make_scheduler, backend, kind, priority, preempt_kinds):
    overrides = {} if preempt_kinds is None else {'preemptible_kinds': preempt_kinds}
    scheduler = make_scheduler(**overrides)
    backend.answers['chatter'] = 40
    low = scheduler.submit(_request('chatter', budget_s=30.0, priority=0))
    backend.wait_started('chatter')
    other = scheduler.submit(_request('other', budget_s=30.0, priority=priority, kind=kind))
    assert low.result(timeout=5).status is RequestStatus.OK
    assert other.result(timeout=5).status is RequestStatus.OK
    assert backend.started == ['chatter', 'other']


def test_cancel_queued_request(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['first'] = 100
    first = scheduler.submit(_request('first', budget_s=30.0))
    backend.wait_started('first')
    queued = scheduler.submit(_request('queued', budget_s=30.0))
    assert scheduler.cancel('queued')
    assert queued.done()
    assert queued.result().status is RequestStatus.CANCELED
    assert not scheduler.cancel('queued'), 'an answered request cannot be canceled again'
    assert first.result(timeout=5).status is RequestStatus.OK
    assert 'queued' not in backend.started


def test_cancel_running_request_stops_generation(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['long'] = 100_000
    running = scheduler.submit(_request('long', budget_s=60.0))
    backend.wait_started('long')
    assert running.cancel()
    assert running.result(timeout=1).status is RequestStatus.CANCELED
    after = scheduler.submit(_request('after', budget_s=5.0)).result(timeout=5)
    assert after.status is RequestStatus.OK, 'the backend stopped and the next one ran'


def test_backend_exception_is_error_and_serving_continues(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.fail.add('bad')
    bad = scheduler.submit(_request('bad')).result(timeout=5)
    assert bad.status is RequestStatus.ERROR
    assert 'simulated fault on bad' in bad.status_message
    assert scheduler.stats().consecutive_errors == 1
    good = scheduler.submit(_request('good')).result(timeout=5)
    assert good.status is RequestStatus.OK
    assert scheduler.stats().consecutive_errors == 0


def test_shutdown_answers_everyone_and_returns_promptly(backend):
    scheduler = Scheduler(backend, _config())
    backend.answers['long'] = 100_000
    running = scheduler.submit(_request('long', budget_s=60.0))
    backend.wait_started('long')
    queued = [scheduler.submit(_request(f'q{i}', budget_s=60.0)) for i in range(3)]
    start = time.monotonic()
    assert scheduler.shutdown(timeout=5.0)
    assert time.monotonic() - start < 2.0
    for handle in [running, *queued]:
        assert handle.result(timeout=0).status is RequestStatus.INACTIVE
    late = scheduler.submit(_request('late')).result(timeout=0)
    assert late.status is RequestStatus.INACTIVE
    assert backend.started == ['long']


def test_deactivate_answers_inactive_and_activate_serves_again(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['long'] = 100_000
    running = scheduler.submit(_request('long', budget_s=60.0))
    backend.wait_started('long')
    queued = scheduler.submit(_request('queued', budget_s=60.0))
    scheduler.set_active(False)
    assert running.result(timeout=1).status is RequestStatus.INACTIVE
    assert queued.result(timeout=0).status is RequestStatus.INACTIVE
    assert scheduler.submit(_request('while-off')).result(0).status is RequestStatus.INACTIVE
    scheduler.set_active(True)
    assert scheduler.submit(_request('back')).result(timeout=5).status is RequestStatus.OK


def test_watchdog_answers_at_deadline_when_backend_overruns(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['stubborn'] = 3
    backend.stalls['stubborn'] = 1.0
    handle = scheduler.submit(_request('stubborn', budget_s=0.3))
    outcome = handle.result(timeout=5)
    assert outcome.status is RequestStatus.BUDGET_EXCEEDED
    assert outcome.status_message.startswith('no answer by the deadline'), \
        'answered by the watchdog at the deadline, before the backend returned'
    # What the watchdog knows is reported: the prompt it counted, nothing streamed yet.
    assert outcome.result is not None and outcome.result.finish_reason is FinishReason.DEADLINE
    assert outcome.result.usage.prompt_tokens > 0
    assert outcome.result.usage.completion_tokens == 0
    assert outcome.total_s < 0.55
    after = scheduler.submit(_request('after', budget_s=5.0)).result(timeout=5)
    assert after.ok and backend.started == ['stubborn', 'after']


def test_late_answer_is_never_ok(make_scheduler, backend):
    scheduler = make_scheduler(deadline_grace_s=10.0)
    backend.answers['stubborn-late'] = 3
    backend.stalls['stubborn-late'] = 0.2
    outcome = scheduler.submit(_request('stubborn-late', budget_s=0.1)).result(timeout=5)
    assert outcome.status is RequestStatus.BUDGET_EXCEEDED
    assert outcome.result is not None and outcome.result.finish_reason is FinishReason.STOP
    assert 'after the deadline' in outcome.status_message


def test_queued_request_that_can_no_longer_make_it_is_answered_by_its_deadline(
        make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['slow'] = 200
    slow = scheduler.submit(_request('slow', budget_s=30.0, priority=9))
    backend.wait_started('slow')
    waiting = scheduler.submit(_request('waiting', budget_s=0.25))
    outcome = waiting.result(timeout=5)
    assert outcome.status in (RequestStatus.REJECTED_BUDGET, RequestStatus.BUDGET_EXCEEDED)
    assert outcome.total_s <= 0.25 + 0.1
    assert slow.result(timeout=5).status is RequestStatus.OK
    assert 'waiting' not in backend.started


def test_full_queue_evicts_lower_priority_or_rejects_newcomer(make_scheduler, backend):
    scheduler = make_scheduler(max_queue=2)
    backend.answers['long'] = 100_000
    running = scheduler.submit(_request('long', budget_s=60.0, priority=9))
    backend.wait_started('long')
    low = scheduler.submit(_request('low', budget_s=60.0, priority=0))
    mid = scheduler.submit(_request('mid', budget_s=60.0, priority=1))
    same = scheduler.submit(_request('same', budget_s=60.0, priority=0))
    assert same.result(0).status is RequestStatus.REJECTED_BUSY
    high = scheduler.submit(_request('high', budget_s=60.0, priority=5))
    assert low.result(0).status is RequestStatus.REJECTED_BUSY
    assert 'high' in low.result().status_message
    assert not mid.done() and not high.done()
    running.cancel()
    assert high.result(timeout=5).ok and mid.result(timeout=5).ok
    assert backend.started == ['long', 'high', 'mid']


def test_same_priority_runs_earliest_deadline_first(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['long'] = 60
    scheduler.submit(_request('long', budget_s=60.0))
    backend.wait_started('long')
    later = scheduler.submit(_request('later', budget_s=20.0))
    sooner = scheduler.submit(_request('sooner', budget_s=10.0))
    assert later.result(timeout=5).ok and sooner.result(timeout=5).ok
    assert backend.started == ['long', 'sooner', 'later']


def test_invalid_requests_are_answered_not_raised(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['dup'] = 60
    assert scheduler.submit(_request('neg', budget_s=-1.0)).result(0).status \
        is RequestStatus.INVALID_REQUEST
    first = scheduler.submit(_request('dup', budget_s=30.0))
    second = scheduler.submit(_request('dup', budget_s=30.0)).result(0)
    assert second.status is RequestStatus.INVALID_REQUEST and 'already pending' in \
        second.status_message

    def bad_factory() -> GenerationRequest:
        raise ValueError('unknown tool "fly"')

    invalid = scheduler.submit(ScheduledRequest(payload=bad_factory, id='f')).result(5)
    assert invalid.status is RequestStatus.INVALID_REQUEST and 'fly' in invalid.status_message
    assert first.result(timeout=5).ok
    with pytest.raises(TypeError):
        scheduler.submit('not a request')


def test_factory_payload_runs_at_dispatch_with_deadline_and_token(make_scheduler, backend):
    scheduler = make_scheduler()
    built: list[float] = []

    def factory() -> GenerationRequest:
        built.append(time.monotonic())
        return _request('factory').payload

    handle = scheduler.submit(ScheduledRequest(payload=factory, id='fac', budget_s=2.0))
    outcome = handle.result(timeout=5)
    assert outcome.ok and len(built) == 1 and outcome.request_id == 'fac'
    assert backend.started == ['factory']


def test_warm_up_measures_rates(backend):
    with Scheduler(backend, SchedulerConfig(min_new_tokens=2)) as scheduler:
        backend.default_tokens = 6
        rates = scheduler.warm_up(rounds=2, max_tokens=6)
        assert rates.measurements == 1
        assert 0.2 / DECODE_S < rates.decode_tokens_per_s < 2.0 / DECODE_S, 'not the prior'
        assert len(backend.started) == 2


def test_stats_report_counts_and_speed(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['a'] = 5
    scheduler.submit(_request('a')).result(timeout=5)
    scheduler.submit(_request('b', budget_s=1e-6)).result(timeout=5)
    stats = scheduler.stats()
    assert stats.counts['OK'] == 1 and stats.counts['REJECTED_BUDGET'] == 1
    assert stats.answered == stats.submitted == 2
    assert stats.avg_tokens_per_s > 0 and stats.last_ttft_s > 0


def test_callback_exception_does_not_break_scheduler(make_scheduler, backend):
    scheduler = make_scheduler()

    def explode(outcome: Outcome) -> None:
        raise RuntimeError('caller bug')

    assert scheduler.submit(_request('x'), callback=explode).result(timeout=5).ok
    assert scheduler.submit(_request('y')).result(timeout=5).ok


def test_config_errors_name_the_parameter():
    with pytest.raises(ValueError, match='max_queue'):
        SchedulerConfig(max_queue=0)
    with pytest.raises(ValueError, match='default_budget_s'):
        SchedulerConfig(default_budget_s=float('nan'))


# --------------------------------------------------------------------------- dropped calls
# A tool call the model wrote but that was not passed on is reported, counted, and under
# tool_choice REQUIRED an answer without a valid call is INVALID_OUTPUT, never OK.

NAVIGATE_REFUSED = 'call_0: navigate_to: speed 9 > max 1.0'


def test_dropped_tool_call_is_reported_and_counted(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.rejected['refused'] = [NAVIGATE_REFUSED]
    outcome = scheduler.submit(_request('refused')).result(timeout=5)
    assert outcome.status is RequestStatus.OK, 'tool_choice auto: a reply without calls is fine'
    assert outcome.status_message == f'dropped 1 tool call: {NAVIGATE_REFUSED}'
    assert scheduler.stats().dropped_tool_calls == 1


def test_dropped_calls_are_counted_per_call_not_per_problem(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.rejected['two'] = [NAVIGATE_REFUSED, 'call_0: navigate_to: place is required',
                               "call_1: tool 'fly' is not allowed for this request"]
    outcome = scheduler.submit(_request('two')).result(timeout=5)
    assert outcome.status_message.startswith('dropped 2 tool calls: ')
    assert scheduler.stats().dropped_tool_calls == 2


def test_required_answer_without_valid_call_is_invalid_output(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.rejected['refused'] = [NAVIGATE_REFUSED]
    outcome = scheduler.submit(_request('refused', tool_choice=ToolChoice.REQUIRED)).result(5)
    assert outcome.status is RequestStatus.INVALID_OUTPUT
    assert int(outcome.status) == 9
    assert outcome.status_message == ('no valid tool call although one is required; dropped 1 '
                                      f'tool call: {NAVIGATE_REFUSED}')
    assert scheduler.stats().counts['INVALID_OUTPUT'] == 1


def test_required_answer_cut_by_own_max_tokens_is_invalid_output(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.answers['cut'] = 100
    backend.rejected['cut'] = ['generation ended by length: incomplete tool calls dropped']
    outcome = scheduler.submit(_request('cut', max_tokens=5,
                                        tool_choice=ToolChoice.REQUIRED)).result(timeout=5)
    assert outcome.status is RequestStatus.INVALID_OUTPUT
    assert outcome.status_message.startswith(
        'no valid tool call although one is required, stopped at max_tokens (5); dropped 1 '
        'tool call: generation ended by length')


def test_required_answer_with_a_valid_call_is_ok(make_scheduler, backend):
    scheduler = make_scheduler()
    backend.calls['go'] = [ToolCall('call_0', 'navigate_to', {'place': 'dock'})]
    outcome = scheduler.submit(_request('go', tool_choice=ToolChoice.REQUIRED)).result(5)
    assert outcome.status is RequestStatus.OK and outcome.status_message == ''
    assert scheduler.stats().dropped_tool_calls == 0


# --------------------------------------------------------------------------- estimates


def _learn_answer_lengths(scheduler: Scheduler) -> None:
    """Run enough answers that admission plans from their lengths, not from the prior."""
    for index in range(4):
        assert scheduler.submit(_request(f'learn{index}')).result(timeout=5).ok


def test_admission_plans_the_typical_answer_not_a_minimum(make_scheduler, backend):
    # Answers of 40 tokens (0.2 s) are learned; a request whose budget fits 16 tokens but
    # not 40 is refused at the door instead of being cut at its deadline.
    scheduler = make_scheduler(min_new_tokens=2)
    backend.default_tokens = 40
    _learn_answer_lengths(scheduler)
    handle = scheduler.submit(_request('tight', budget_s=0.12))
    assert handle.done(), 'decided inside submit()'
    outcome = handle.result(timeout=0)
    assert outcome.status is RequestStatus.REJECTED_BUDGET
    assert outcome.estimate.decode_tokens == 40
    assert scheduler.submit(_request('roomy', budget_s=1.0)).result(timeout=5).ok


def test_admission_counts_the_queue_at_its_real_lengths(make_scheduler, backend):
    # A 40-token answer running and two queued ahead (0.2 s each): 0.45 s is not enough.
    scheduler = make_scheduler(min_new_tokens=2)
    backend.default_tokens = 40
    _learn_answer_lengths(scheduler)
    backend.answers['running'] = 40
    backend.stalls['running'] = 0.3
    running = scheduler.submit(_request('running', budget_s=5.0))
    backend.wait_started('running')
    queued = [scheduler.submit(_request(f'q{i}', budget_s=5.0, priority=1)) for i in range(2)]
    late = scheduler.submit(_request('late', budget_s=0.45))  # runs after the priority-1 pair
    assert late.done(), 'decided inside submit()'
    outcome = late.result(timeout=0)
    assert outcome.status is RequestStatus.REJECTED_BUDGET
    assert outcome.estimate.wait_s > 0.4, outcome.status_message
    assert all(h.result(timeout=5).ok for h in [running, *queued])


def test_newcomer_that_would_make_an_admitted_request_late_is_refused(make_scheduler, backend):
    # Answers of 80 tokens (A = about 0.4 s) are learned. 'admitted' (2.5 A) fits after the
    # running one; 'jumper' (2.25 A) would fit itself, but it would run first (earlier
    # deadline) and push 'admitted' to about 3 A: the "yes" already given is kept, the
    # newcomer is told "no". Budgets follow the learned A, which a loaded host stretches.
    scheduler = make_scheduler(min_new_tokens=2)
    backend.default_tokens = 80
    _learn_answer_lengths(scheduler)
    rates = scheduler.rates()
    answer_s = rates.overhead_s + rates.prefill_s(5) + \
        rates.decode_s_per_token * rates.completion_tokens
    running = scheduler.submit(_request('running', budget_s=5.0 + 10 * answer_s))
    backend.wait_started('running')
    admitted = scheduler.submit(_request('admitted', budget_s=2.5 * answer_s))
    assert not admitted.done()
    jumper = scheduler.submit(_request('jumper', budget_s=2.25 * answer_s))
    assert jumper.done(), 'decided inside submit()'
    assert jumper.result(0).status is RequestStatus.REJECTED_BUDGET
    assert "'admitted'" in jumper.result(0).status_message
    assert admitted.result(timeout=30).ok and running.result(timeout=30).ok


# --------------------------------------------------------------------------- engine lifecycle
# Engine.submit races close() and set_active() on other threads (as the node's intake thread
# races lifecycle transitions): it never raises, and every request gets exactly one answer.


class EngineFakeBackend(Backend):
    """A backend for the engine that frees its "model" like a real one.

    Counting or generating after ``unload`` raises ``BackendError`` (as llama.cpp's does);
    ``unload`` while a generation runs would be a use-after-free and is recorded.
    ``block`` makes ``generate`` wait for it, ignoring deadline and cancel (a prefill chunk
    that cannot be aborted); ``count_error`` makes counting fail.
    """

    def __init__(self, tools: ToolRegistry) -> None:
        super().__init__(tools)
        self.guard = ModelGuard()
        self.freed = threading.Event()
        self.generating = 0
        self.freed_while_generating = False
        self.block: Optional[threading.Event] = None
        self.started = threading.Event()
        self.count_error: Optional[Exception] = None

    def load(self, cancel=None) -> ModelInfo:
        self.guard.open()
        return ModelInfo('fake', 'fake', 'none', 4096, 100, False)

    def unload(self) -> None:
        self.guard.retire()
        if self.generating:
            self.freed_while_generating = True
        self.freed.set()

    @property
    def loaded(self) -> bool:
        return not self.freed.is_set()

    def count_tokens(self, text: str) -> int:
        with self.guard.use():
            if self.count_error is not None:
                raise self.count_error
            time.sleep(0.0002)  # a tokenize takes a while: widens the race with close()
            return len(text.split())

    def generate(self, request: GenerationRequest) -> GenerationResult:
        with self.guard.use():
            self.generating += 1
            try:
                return self._generate(request)
            finally:
                self.generating -= 1

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        self.started.set()
        if self.block is not None and request.sampling.max_tokens > 1:
            self.block.wait(10.0)
        usage = Usage(prompt_tokens=5, prefill_s=0.001, time_to_first_token_s=0.001)
        for _ in range(min(3, request.sampling.max_tokens)):
            if request.cancel is not None and request.cancel.cancelled:
                return GenerationResult(finish_reason=request.cancel.reason, usage=usage)
            time.sleep(0.001)  # stands in for one decode step of a real backend
            usage.completion_tokens += 1
        usage.decode_s = 0.002
        return GenerationResult(text='ok', usage=usage)


@pytest.fixture
def fake_engine(monkeypatch):
    from nemotron_ros.engine import runtime
    from nemotron_ros.engine.config import EngineConfig

    made: list[EngineFakeBackend] = []

    def create(kind, tools, options):
        made.append(EngineFakeBackend(tools))
        return made[-1]

    monkeypatch.setattr(runtime, 'create_backend', create)

    def load() -> tuple[runtime.Engine, EngineFakeBackend]:
        engine = runtime.Engine(clock=time.monotonic)
        engine.load(EngineConfig(model_path='fake.gguf', warm_up=False))
        engine.set_active(True)
        made[-1].started.clear()  # set by the prefix priming in load
        return engine, made[-1]

    return load


class _Answers:
    """Records every answer per request id, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_id: dict[str, list[Outcome]] = {}

    def __call__(self, outcome: Outcome) -> None:
        with self.lock:
            self.by_id.setdefault(outcome.request_id, []).append(outcome)

    def statuses(self) -> Counter:
        with self.lock:
            return Counter(o.status for outcomes in self.by_id.values() for o in outcomes)


@pytest.mark.parametrize('transition', ['close', 'deactivate', 'reload'])
def test_submit_racing_lifecycle_transitions_answers_each_request_once(fake_engine, caplog,
                                                                       transition):
    rng = random.Random(transition)
    for iteration in range(30):
        engine, backend = fake_engine()
        answers, ids, raised = _race_once(engine, transition, rng.uniform(0.0, 0.003),
                                          prefix=f'{iteration}-')
        assert not raised, raised
        assert set(answers.by_id) == set(ids)
        assert all(len(outcomes) == 1 for outcomes in answers.by_id.values())
        assert not backend.freed_while_generating
        # Budgets are ample: the only outcomes are served, refused for a full queue, or
        # answered INACTIVE by the transition.
        assert set(answers.statuses()) <= {RequestStatus.OK, RequestStatus.INACTIVE,
                                           RequestStatus.REJECTED_BUSY}
    assert 'second answer' not in caplog.text


def _race_once(engine, transition: str, delay_s: float, prefix: str
               ) -> tuple[_Answers, list[str], list[BaseException]]:
    """Three threads submit 20 prompts each while a fourth runs ``transition``."""
    from nemotron_ros.engine.runtime import Prompt

    answers = _Answers()
    raised: list[BaseException] = []
    ids: list[str] = []
    barrier = threading.Barrier(4)

    def submitter(index: int) -> None:
        barrier.wait()
        for n in range(20):
            request_id = f'{prefix}{index}-{n}'
            ids.append(request_id)
            try:
                engine.submit(Prompt(text='go to the dock', id=request_id,
                                     budget_ms=600_000), answers)
            except BaseException as exc:  # the contract is "never raises"
                raised.append(exc)

    def transitioner() -> None:
        barrier.wait()
        time.sleep(delay_s)  # the race's offset (swept by the caller), not a synchronization
        if transition == 'close':
            engine.close('shutting down')
        elif transition == 'deactivate':
            engine.set_active(False)
        else:
            fake_engine_reload(engine)

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=transitioner))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    engine.close()
    return answers, ids, raised


def fake_engine_reload(engine) -> None:
    """Configure again while serving (cleanup + configure): everything pending is INACTIVE."""
    from nemotron_ros.engine.config import EngineConfig

    engine.load(EngineConfig(model_path='fake.gguf', warm_up=False))


def test_submit_answers_error_when_counting_fails_and_never_raises(fake_engine):
    from nemotron_ros.engine.runtime import Prompt

    engine, backend = fake_engine()
    answers = _Answers()
    backend.count_error = RuntimeError('tokenizer exploded')
    engine.submit(Prompt(text='go', id='count'), answers)
    (outcome,) = answers.by_id['count']
    assert outcome.status is RequestStatus.ERROR
    assert outcome.status_message == ('could not take the request: RuntimeError: tokenizer '
                                      'exploded')
    backend.count_error = None

    def explode(outcome: Outcome) -> None:
        raise RuntimeError('caller bug')

    engine.submit(Prompt(text='go', id='bad-callback'), explode)  # must not raise
    engine.close()


def test_submit_after_close_answers_inactive_with_the_close_reason(fake_engine):
    from nemotron_ros.engine.runtime import Prompt

    engine, backend = fake_engine()
    answers = _Answers()
    backend.block = threading.Event()
    engine.submit(Prompt(text='running', id='running', budget_ms=30000), answers)
    assert backend.started.wait(5)
    engine.submit(Prompt(text='queued', id='queued', budget_ms=30000), answers)
    backend.block.set()
    engine.close('shutting down')
    engine.submit(Prompt(text='late', id='late'), answers)
    for request_id in ('running', 'queued', 'late'):
        (outcome,) = answers.by_id[request_id]
        assert outcome.status is RequestStatus.INACTIVE
        assert outcome.status_message == 'shutting down'


def test_close_never_frees_the_model_under_a_running_generation(fake_engine, caplog):
    from nemotron_ros.engine.runtime import Prompt

    engine, backend = fake_engine()
    answers = _Answers()
    backend.block = threading.Event()  # a generation that ignores its cancel token
    engine.submit(Prompt(text='stuck', id='stuck', budget_ms=30000), answers)
    assert backend.started.wait(5)
    with caplog.at_level('WARNING'):
        start = time.monotonic()
        engine.close('shutting down', timeout_s=0.2)
        assert time.monotonic() - start < 2.0, 'close returns, it does not hang'
    assert answers.by_id['stuck'][0].status is RequestStatus.INACTIVE
    assert 'the model is kept in memory' in caplog.text
    assert not backend.freed.is_set(), 'freed while the generation still runs'
    backend.block.set()
    assert backend.freed.wait(5), 'freed once the generation ended'
    assert not backend.freed_while_generating


# --------------------------------------------------------------------------- real models
# The same contracts on llama.cpp with a real GGUF file: the tiny random-weight nemotron_h runs
# llama.cpp's real hybrid code path. No mocks: where a test needs a generation that is still
# running when it acts, the request streams to a slow consumer (``on_token`` sleeps, as a slow
# feedback publisher would), because the tiny model decodes thousands of tokens per second and
# ends its answers after a few dozen.

REAL_MODELS = ('tiny_nemotron_h', 'smollm2')
LONG_PROMPT = 'Count from 1 to 500, one number per line, without stopping.'


@pytest.fixture(scope='module', params=REAL_MODELS)
def real_backend(request, tmp_path_factory):
    pytest.importorskip('llama_cpp', reason='llama-cpp-python is not installed')
    from nemotron_ros.engine.backends.llama.backend import LlamaBackend, LlamaConfig
    from nemotron_ros.testing import models

    if request.param == 'smollm2':
        try:
            path = models.smollm2_gguf_path()
        except FileNotFoundError as exc:
            pytest.skip(str(exc))
    else:
        path = models.tiny_nemotron_h_path(tmp_path_factory.mktemp('models'))
    backend = LlamaBackend(LlamaConfig(model_path=str(path), n_ctx=2048, n_threads=1),
                           ToolRegistry())
    backend.load()
    yield backend
    backend.unload()


@pytest.fixture
def real_scheduler(real_backend):
    scheduler = Scheduler(real_backend, SchedulerConfig(max_queue=4, min_new_tokens=4))
    scheduler.warm_up(rounds=2, max_tokens=8)
    yield scheduler
    assert scheduler.shutdown(timeout=10.0)


def _real(tag: str, text: str = 'Bring the red cup to the table.', budget_s: float = 10.0,
          priority: int = 0, kind: RequestKind = RequestKind.TOPIC, max_tokens: int = 16,
          on_token=None, ignore_eos: bool = False) -> ScheduledRequest:
    generation = GenerationRequest(
        messages=[Message('system', 'You are a helpful robot.'), Message('user', text)],
        constrained=False, sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos),
        on_token=on_token)
    return ScheduledRequest(payload=generation, id=tag, budget_s=budget_s, priority=priority,
                            kind=kind)


def _admissible_budget_s(scheduler: Scheduler) -> float:
    """A budget admission accepts for the long prompt: 2 s, or 1.5x its estimate when the
    machine is slower than that (a loaded CI host), so the deadline, not admission, cuts it.

    The estimate comes from a request refused at the door, which teaches the rates nothing.
    """
    probe = scheduler.submit(_real('probe', LONG_PROMPT, budget_s=0.001, max_tokens=1000,
                                   ignore_eos=True)).result(timeout=10)
    assert probe.status is RequestStatus.REJECTED_BUDGET, probe.status_message
    return max(2.0, 1.5 * probe.estimate.total_s)


def _slow_consumer(delay_s: float = 0.02) -> tuple[threading.Event, object]:
    started = threading.Event()

    def on_token(text: str) -> None:
        started.set()
        time.sleep(delay_s)

    return started, on_token


def test_real_impossible_budget_is_rejected_without_generation(real_scheduler):
    before = real_scheduler.rates().measurements
    tokens: list[str] = []
    handle = real_scheduler.submit(_real('tight', ' '.join(['robot'] * 500), budget_s=0.001,
                                         on_token=tokens.append))
    assert handle.done(), 'decided inside submit(), before any generation'
    outcome = handle.result(timeout=0)
    assert outcome.status is RequestStatus.REJECTED_BUDGET
    assert 'estimate' in outcome.status_message
    assert tokens == [] and real_scheduler.rates().measurements == before


def test_real_feasible_budget_is_met(real_scheduler):
    outcome = real_scheduler.submit(_real('easy', budget_s=20.0)).result(timeout=30)
    assert outcome.status is RequestStatus.OK, outcome.status_message
    assert outcome.total_s <= 20.0
    assert outcome.result.usage.completion_tokens > 0


def test_real_deadline_is_enforced_during_generation(real_scheduler):
    # Admission plans a typical answer (the 32-token prior here), so the budget must fit one;
    # this answer never ends by itself (ignore_eos), and the budget cuts it.
    budget_s = _admissible_budget_s(real_scheduler)
    _, on_token = _slow_consumer()
    outcome = real_scheduler.submit(_real('long', LONG_PROMPT, budget_s=budget_s,
                                          max_tokens=1000, on_token=on_token,
                                          ignore_eos=True)).result(timeout=budget_s + 10)
    assert outcome.status is RequestStatus.BUDGET_EXCEEDED, outcome.status_message
    assert outcome.total_s < budget_s + 0.25
    assert outcome.result is None or outcome.result.tool_calls == []


def test_real_flood_from_threads_is_answered_exactly_once(real_scheduler):
    calls: Counter = Counter()
    lock = threading.Lock()
    handles = []

    def record(outcome: Outcome) -> None:
        with lock:
            calls[outcome.request_id] += 1

    def client(index: int) -> None:
        for n in range(12):
            request = _real(f'r{index}-{n}', budget_s=(0.05, 0.5, 5.0)[n % 3], priority=n % 3,
                            kind=(RequestKind.TOPIC, RequestKind.SERVICE)[n % 2], max_tokens=8)
            handle = real_scheduler.submit(request, callback=record)
            with lock:
                handles.append((request, handle))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = Counter()
    for request, handle in handles:
        outcome = handle.result(timeout=30)
        statuses[outcome.status] += 1
        if outcome.ok:
            assert outcome.total_s <= request.budget_s + 1e-9
    assert len(calls) == len(handles) == 36 and set(calls.values()) == {1}
    stats = real_scheduler.stats()
    assert stats.answered == stats.submitted and stats.queue_depth == 0
    assert set(statuses) <= {RequestStatus.OK, RequestStatus.REJECTED_BUSY,
                             RequestStatus.REJECTED_BUDGET, RequestStatus.BUDGET_EXCEEDED,
                             RequestStatus.PREEMPTED}


def test_real_service_preempts_topic_command(real_scheduler):
    started, on_token = _slow_consumer()
    low = real_scheduler.submit(_real('chatter', LONG_PROMPT, budget_s=60.0,
                                      max_tokens=1000, on_token=on_token))
    assert started.wait(timeout=30)
    high = real_scheduler.submit(_real('plan', budget_s=30.0, priority=5,
                                       kind=RequestKind.SERVICE))
    assert low.result(timeout=10).status is RequestStatus.PREEMPTED
    assert high.result(timeout=30).status is RequestStatus.OK


def test_real_cancel_running_and_queued(real_scheduler):
    started, on_token = _slow_consumer()
    running = real_scheduler.submit(_real('running', LONG_PROMPT, budget_s=60.0,
                                          max_tokens=1000, on_token=on_token))
    assert started.wait(timeout=30)
    queued = real_scheduler.submit(_real('queued', budget_s=60.0))
    assert real_scheduler.cancel('queued')
    assert queued.result(timeout=0).status is RequestStatus.CANCELED
    assert real_scheduler.cancel('running')
    assert running.result(timeout=10).status is RequestStatus.CANCELED
    after = real_scheduler.submit(_real('after', budget_s=30.0)).result(timeout=30)
    assert after.status is RequestStatus.OK, 'the backend stopped and serves the next request'


def test_real_backend_fault_is_error_then_serving_continues(real_scheduler, real_backend):
    real_backend.unload()
    try:
        failed = real_scheduler.submit(_real('unloaded', budget_s=30.0)).result(timeout=30)
    finally:
        real_backend.load()
    assert failed.status is RequestStatus.ERROR and 'no model is loaded' in failed.status_message
    again = real_scheduler.submit(_real('reloaded', budget_s=30.0)).result(timeout=30)
    assert again.status is RequestStatus.OK, again.status_message


def test_real_shutdown_answers_everyone(real_backend):
    scheduler = Scheduler(real_backend, SchedulerConfig(max_queue=4, min_new_tokens=4))
    started, on_token = _slow_consumer()
    running = scheduler.submit(_real('running', LONG_PROMPT, budget_s=60.0,
                                     max_tokens=1000, on_token=on_token))
    assert started.wait(timeout=30)
    queued = [scheduler.submit(_real(f'q{i}', budget_s=60.0)) for i in range(3)]
    assert scheduler.shutdown(timeout=10.0)
    assert {h.result(timeout=0).status for h in [running, *queued]} == {RequestStatus.INACTIVE}


def test_real_budget_cut_answer_reports_usage_by_the_deadline(real_scheduler):
    # A slow consumer (a feedback publisher) makes each step slower than the learned rate;
    # the generation is still told to stop early enough that its own cut answer, with usage,
    # is in hand by the deadline (not a bare BUDGET_EXCEEDED from the watchdog).
    budget_s = _admissible_budget_s(real_scheduler)
    _, on_token = _slow_consumer()
    outcome = real_scheduler.submit(_real('cut', LONG_PROMPT, budget_s=budget_s,
                                          max_tokens=1000, on_token=on_token,
                                          ignore_eos=True)).result(timeout=budget_s + 10)
    assert outcome.status is RequestStatus.BUDGET_EXCEEDED, outcome.status_message
    assert outcome.status_message.startswith('stopped at the deadline after'), \
        outcome.status_message
    usage = outcome.result.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.time_to_first_token_s > 0 and usage.prefill_s > 0
    assert outcome.total_s <= budget_s + 0.05, 'answered by the deadline (generous bound)'


def test_real_unload_waits_for_the_running_generation(tmp_path):
    pytest.importorskip('llama_cpp', reason='llama-cpp-python is not installed')
    from nemotron_ros.engine.backends import BackendError
    from nemotron_ros.engine.backends.llama.backend import LlamaBackend, LlamaConfig
    from nemotron_ros.testing import models

    path = models.tiny_nemotron_h_path(tmp_path)
    backend = LlamaBackend(LlamaConfig(model_path=str(path), n_ctx=512, n_threads=1),
                           ToolRegistry())
    backend.load()
    streaming = threading.Event()
    release = threading.Event()
    results: list[GenerationResult] = []

    def on_token(piece: str) -> None:  # holds the generation between two decode steps
        streaming.set()
        release.wait(10)

    generation = threading.Thread(target=lambda: results.append(backend.generate(
        GenerationRequest(messages=[Message('user', LONG_PROMPT)], constrained=False,
                          sampling=SamplingParams(max_tokens=8, ignore_eos=True),
                          on_token=on_token))))
    generation.start()
    assert streaming.wait(10)
    unloader = threading.Thread(target=backend.unload)
    unloader.start()
    unloader.join(timeout=0.3)
    assert unloader.is_alive(), 'unload must wait for the running generation'
    assert backend.loaded
    release.set()
    generation.join(timeout=10)
    unloader.join(timeout=10)
    assert not unloader.is_alive() and not backend.loaded
    assert results[0].usage.completion_tokens == 8, 'the generation finished on live memory'
    with pytest.raises(BackendError, match='no model is loaded'):
        backend.count_tokens('after unload')


def test_real_count_new_tokens_is_what_generate_evaluates(real_backend):
    # Admission's count, at the door and at dispatch, is exactly the number of tokens the
    # backend evaluates: the whole prompt while its prefix is not the cached one, the part
    # after the prefix once it is.
    request = GenerationRequest(
        messages=[Message('system', 'You are a careful robot. ' * 20),
                  Message('user', 'Bring the red cup to the table.')],
        constrained=False, sampling=SamplingParams(max_tokens=2))
    counted = []
    evaluated = []
    for _ in range(2):
        counted.append(real_backend.count_new_tokens(request))
        usage = real_backend.generate(request).usage
        evaluated.append(usage.prompt_tokens - usage.prompt_tokens_reused)
    assert counted == evaluated
    assert counted[1] < counted[0], 'the second time the prefix is reused'
