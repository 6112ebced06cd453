"""Admission tells the truth: "no" at once when a budget cannot be met, "yes" only when it can.

Engine-level, with the real SmolLM2 model through llama.cpp (one thread, ``tool_choice``
required) and a ~1,500-character system prompt, the case where counting only the user text
at the door and the whole message list at dispatch made the two disagree. The engine now
counts exactly the tokens the backend will evaluate after its reused prefix, in both places.
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from nemotron_ros.engine.runtime import Engine, Prompt
from nemotron_ros.engine.scheduler import Outcome, RequestKind, RequestStatus
from nemotron_ros.engine.world_state import Observation

pytest.importorskip('llama_cpp', reason='llama-cpp-python is not installed')

LONG_SYSTEM_PROMPT = (
    'You control a mobile manipulator in a family home with a kitchen, a living room, a '
    'hallway and a charging dock. Keep at least one meter from people and never move while '
    'someone stands in your path. Prefer short, safe motions and stop when unsure. ' * 6)[:1500]
COMMAND = 'Go to the charging dock.'


class PausableClock:
    """The engine's clock: monotonic time, or one instant while a test holds it still.

    The world state renders each observation's age (0.1 s steps), so the same observations
    render to different text, and token counts, from one call to the next.
    """

    def __init__(self) -> None:
        self.held: float | None = None

    def __call__(self) -> float:
        return time.monotonic() if self.held is None else self.held


CLOCK = PausableClock()


@pytest.fixture(scope='module')
def engine():
    from nemotron_ros.engine.config import EngineConfig
    from nemotron_ros.testing import models

    try:
        path = models.smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    engine = Engine(clock=CLOCK)
    engine.load(EngineConfig(model_path=str(path), n_threads=1, tool_choice='required',
                             max_tool_calls=1, system_prompt=LONG_SYSTEM_PROMPT,
                             response_margin_ms=0))
    engine.set_active(True)
    yield engine
    engine.close()


def _call(engine: Engine, budget_ms: int, text: str = COMMAND) -> tuple[Outcome, bool]:
    """Submit and wait; returns the outcome and whether it was decided inside submit()."""
    answered = threading.Event()
    returned = threading.Event()
    box: list[tuple[Outcome, bool]] = []

    def on_outcome(outcome: Outcome) -> None:
        box.append((outcome, not returned.is_set()))
        answered.set()

    engine.submit(Prompt(text=text, budget_ms=budget_ms, kind=RequestKind.SERVICE), on_outcome)
    returned.set()
    assert answered.wait(60), 'every request is answered'
    return box[0]


def _true_cost_ms(engine: Engine) -> float:
    """The command's service time with an idle queue: the median of five generous calls.

    Five, so the engine has seen enough answers to plan from them (not from its prior).
    """
    costs = []
    for _ in range(5):
        outcome, _ = _call(engine, 60_000)
        assert outcome.status is RequestStatus.OK, outcome.status_message
        costs.append(outcome.total_s * 1000.0)
    return statistics.median(costs)


def test_budget_sweep_around_the_true_cost(engine):
    true_ms = _true_cost_ms(engine)
    for factor in (0.5, 0.8):
        outcome, at_submit = _call(engine, round(true_ms * factor))
        assert outcome.status is RequestStatus.REJECTED_BUDGET, (factor, outcome.status_message)
        assert at_submit, f'{factor}: refused at admission, not after waiting'
        assert 'estimate' in outcome.status_message
    for factor in (1.25, 1.5, 2.0):
        outcome, at_submit = _call(engine, round(true_ms * factor))
        assert outcome.status is RequestStatus.OK, (factor, true_ms, outcome.status_message)
        assert not at_submit
    # Near the true cost either answer is legitimate: a "no" at the door or an answer in
    # time; BUDGET_EXCEEDED is possible only in this narrow band, where the estimate's own
    # error decides.
    for factor in (0.9, 1.0, 1.1, 1.2):
        outcome, at_submit = _call(engine, round(true_ms * factor))
        if outcome.status is RequestStatus.REJECTED_BUDGET:
            assert at_submit, (factor, outcome.status_message)
        else:
            assert outcome.status in (RequestStatus.OK, RequestStatus.BUDGET_EXCEEDED), \
                (factor, outcome.status_message)


def test_admission_counts_what_the_backend_evaluates(engine):
    # The long system prompt is in the reused prefix: only the user turn is evaluated, and
    # the door's count is exactly that number.
    outcome, _ = _call(engine, 60_000)
    assert outcome.status is RequestStatus.OK, outcome.status_message
    usage = outcome.result.usage
    evaluated = usage.prompt_tokens - usage.prompt_tokens_reused
    assert usage.prompt_tokens_reused > 300, 'the ~1,500-character system prompt is reused'
    assert outcome.estimate.prompt_tokens == evaluated
    assert evaluated < 100


def test_admission_counts_the_world_state(engine):
    # With observations in the world state the prompt grows; the door still counts exactly
    # what is evaluated. The clock is held still so that the rendered ages, and with them the
    # world state's text, stay the same from door to dispatch and from one call to the next.
    now = time.monotonic()
    for index in range(15):
        engine.observe(Observation(source=f'camera{index % 3}', label=f'object {index}',
                                   stamp=now, confidence=0.9, ttl_s=600.0,
                                   attributes={'shelf': index, 'color': 'red'}))
    CLOCK.held = now + 1.0
    try:
        _check_world_state_counts(engine)
    finally:
        CLOCK.held = None


def _check_world_state_counts(engine: Engine) -> None:
    outcome, _ = _call(engine, 120_000)
    assert outcome.status is RequestStatus.OK, outcome.status_message
    usage = outcome.result.usage
    evaluated = usage.prompt_tokens - usage.prompt_tokens_reused
    assert evaluated > 300
    assert outcome.estimate.prompt_tokens == evaluated
    # A budget well below what these tokens cost is refused at the door.
    refused, at_submit = _call(engine, round(outcome.total_s * 1000.0 * 0.5))
    assert refused.status is RequestStatus.REJECTED_BUDGET and at_submit
    assert refused.estimate.prompt_tokens == evaluated
