"""Scheduler contract tests: every request answered exactly once, never late as OK.

The pure-logic tests run against ``SleepBackend``, a deterministic stand-in that sleeps per
token and honours deadline and cancel like a real backend, so the scheduler's ordering and
status decisions can be checked without a model. Assertions are on statuses and ordering, not
on tight timings, because the CI machines are shared.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Optional

import pytest

from nemotron_ros.engine.backend import Backend, ModelInfo
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
    Usage,
)

DECODE_S = 0.005
PREFILL_TOKENS_PER_S = 20000.0


class SleepBackend(Backend):
    """Sleeps ``DECODE_S`` per token; honours deadline and cancel between tokens.

    The user message is the request's tag: ``answers`` maps tags to answer lengths, tags in
    ``fail`` raise, ``stalls`` adds an unforeseeable pause to the prefill, tags starting with
    ``stubborn`` ignore deadline and cancel.
    """

    def __init__(self, default_tokens: int = 4) -> None:
        super().__init__(ToolRegistry())
        self.default_tokens = default_tokens
        self.answers: dict[str, int] = {}
        self.fail: set[str] = set()
        self.stalls: dict[str, float] = {}
        self.started: list[str] = []
        self.max_tokens_seen: dict[str, int] = {}
        self.max_concurrent = 0
        self._running = 0
        self._cv = threading.Condition()

    def load(self) -> ModelInfo:
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
        return GenerationResult(text=text, finish_reason=reason, usage=usage)

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
             request_id: str = '') -> ScheduledRequest:
    generation = GenerationRequest(
        messages=[Message('system', 'You are a robot.'), Message('user', tag)],
        sampling=SamplingParams(max_tokens=max_tokens))
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
    assert outcome.result is None, 'answered at the deadline, before the backend returned'
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
    from nemotron_ros.engine.llama_backend import LlamaBackend, LlamaConfig
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
          on_token=None) -> ScheduledRequest:
    generation = GenerationRequest(
        messages=[Message('system', 'You are a helpful robot.'), Message('user', text)],
        constrained=False, sampling=SamplingParams(max_tokens=max_tokens), on_token=on_token)
    return ScheduledRequest(payload=generation, id=tag, budget_s=budget_s, priority=priority,
                            kind=kind)


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
    _, on_token = _slow_consumer()
    outcome = real_scheduler.submit(_real('long', LONG_PROMPT, budget_s=0.4, max_tokens=1000,
                                          on_token=on_token)).result(timeout=10)
    assert outcome.status is RequestStatus.BUDGET_EXCEEDED, outcome.status_message
    assert outcome.total_s < 0.4 + 0.25
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
