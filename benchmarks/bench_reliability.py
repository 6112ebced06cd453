#!/usr/bin/env python3
"""Reliability at scale: ~1,000 requests under random lifecycle transitions and cancels.

The fault-injection suite (test/test_faults.py) checks each fault once; this benchmark runs the
same kinds of trouble many times at random and counts what a robot would notice. A node on the
tiny ``nemotron_h`` GGUF (one thread) serves, through real DDS:

* ``command`` messages, ``plan`` calls and ``execute`` goals, sent open loop at ``--rate``
  requests per second with budgets log-uniform in [``--budget-min-ms``, ``--budget-max-ms``];
  a share of the goals (``--cancel-share``) is canceled at a random moment;
* a share of the plans and goals (``--hostile-share``) carries a ``context_json`` nested 1,000
  levels deep, which must be refused (INVALID_REQUEST), never end the node;
* while a chaos thread deactivates and re-activates the node, or deactivates, cleans up,
  configures and activates it, every ``--transition-period-s`` seconds on average.

Counted per request, where the caller receives the answer:

* ``answered``: an answer arrived within its deadline + 5 s; ``lost``: none did;
* ``duplicated``: a command answered more than once on ``actions``, or a goal shown in more than
  one terminal state (service answers are one per call by construction);
* ``late``: the answer arrived more than 20 ms after the deadline (measured from sending, so
  DDS both ways is included);
* ``feedback_after_result``: goals whose feedback was published after their terminal state
  (by the server's own timestamps);
* ``crashes``: the executor serving the node died (an exception escaped a callback). The run
  stops there and every request not answered by then, sent or not, counts as lost; the node is
  never restarted, so ``restarts`` stays 0: a crash shows as ``crashes`` 1.

Writes ``benchmarks/results/reliability.json`` (counts, statuses per kind, lateness quantiles,
transitions, one record per request).

    python benchmarks/bench_reliability.py                    # 1,000 requests, ~3 min
    python benchmarks/bench_reliability.py --requests 200     # a quick run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
# The DDS test helpers (RosHarness, Client, ExecuteCaller) are shared with the test suite.
sys.path.insert(1, str(ROOT / 'test'))

from conftest import RosHarness  # noqa: E402
from node_harness import (  # noqa: E402
    DEEP_QOS,
    STATUS_NAMES,
    SUCCESS,
    Client,
    ExecuteCaller,
    deep_plan_client,
    node_params,
)
from unique_identifier_msgs.msg import UUID  # noqa: E402

from nemotron_ros.action import Execute  # noqa: E402
from nemotron_ros.msg import Action, Command  # noqa: E402
from nemotron_ros.node import NemotronNode  # noqa: E402
from nemotron_ros.srv import Plan  # noqa: E402
from nemotron_ros.testing.models import model_by_name  # noqa: E402

KINDS = {'command': 0.45, 'plan': 0.35, 'execute': 0.20}
TEXTS = ('Go to the kitchen.', 'Bring me the red cup.', 'Stop.', 'What is the battery level?',
         'Look at the person by the door.', 'Tell a very long story.')
LOST_AFTER_S = 5.0
#: 2,000 characters of JSON nested 1,000 deep: once enough to end the node (RecursionError).
HOSTILE_CONTEXT = '[' * 1000 + ']' * 1000
LATE_AFTER_S = 0.020
#: The node's max_tokens, and that of goals: they may decode for a while, so cancels land
#: mid-decode too (commands, which cannot ask for less, may run as long).
LONG_GOAL_TOKENS = 400


@dataclass
class Record:
    """One request and what the caller received."""

    kind: str
    index: int
    text: str
    budget_ms: int
    planned: float
    cancel_after_s: Optional[float] = None
    key: str = ''
    sent: float = 0.0
    answers: list[tuple[float, str]] = field(default_factory=list)
    max_tokens: int = 0
    context_json: str = ''
    canceled: bool = False
    goal_status: Optional[int] = None
    feedback_after_result: int = 0

    @property
    def deadline(self) -> float:
        return self.sent + self.budget_ms / 1000.0


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--requests', type=int, default=1000)
    parser.add_argument('--rate', type=float, default=8.0, help='requests offered per second')
    parser.add_argument('--model', default='tiny_nemotron_h',
                        help="'tiny_nemotron_h', 'smollm2' or a GGUF path")
    parser.add_argument('--max-tokens', type=int, default=24,
                        help='max_tokens of plan calls (commands and goals may run longer)')
    parser.add_argument('--queue-size', type=int, default=8)
    parser.add_argument('--budget-min-ms', type=int, default=150)
    parser.add_argument('--budget-max-ms', type=int, default=8000)
    parser.add_argument('--cancel-share', type=float, default=0.5,
                        help='share of execute goals canceled at a random moment')
    parser.add_argument('--hostile-share', type=float, default=0.05,
                        help='share of plans and goals whose context_json is nested too deep')
    parser.add_argument('--transition-period-s', type=float, default=2.0,
                        help='mean time between lifecycle disturbances')
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'reliability'))
    return parser.parse_args(argv)


def _schedule(args: argparse.Namespace, rng: random.Random) -> list[Record]:
    """The requests, their send times (Poisson at ``rate``), budgets and cancels."""
    records, at = [], time.monotonic() + 0.5
    low, high = math.log(args.budget_min_ms), math.log(args.budget_max_ms)
    for index in range(args.requests):
        at += rng.expovariate(args.rate)
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        cancel = rng.uniform(0.0, 0.5) if kind == 'execute' and \
            rng.random() < args.cancel_share else None
        records.append(Record(kind=kind, index=index, text=rng.choice(TEXTS),
                              budget_ms=int(math.exp(rng.uniform(low, high))), planned=at,
                              cancel_after_s=cancel,
                              max_tokens=LONG_GOAL_TOKENS if kind == 'execute' else
                              args.max_tokens,
                              context_json=HOSTILE_CONTEXT if kind != 'command' and
                              rng.random() < args.hostile_share else ''))
    return records


def _wait_until(moment: float, stop: threading.Event) -> bool:
    """Pace the open-loop load: wait for ``moment``; False when the run was stopped."""
    return not stop.wait(max(0.0, moment - time.monotonic()))


def _send_topics_and_plans(client: Client, records: list[Record],
                           stop: threading.Event) -> None:
    publisher = client.node.create_publisher(Command, 'command', DEEP_QOS)
    planner = deep_plan_client(client.node)
    planner.wait_for_service(timeout_sec=10.0)
    for record in records:
        if not _wait_until(record.planned, stop):
            return
        record.sent = time.monotonic()
        if record.kind == 'command':
            record.key = f'rel-{record.index}'
            publisher.publish(Command(id=record.key, text=record.text,
                                      latency_budget_ms=record.budget_ms))
            continue
        future = planner.call_async(Plan.Request(
            goal=record.text, max_tokens=record.max_tokens, context_json=record.context_json,
            latency_budget_ms=record.budget_ms))
        future.add_done_callback(lambda f, r=record: _answered(r, f.result()))


def _answered(record: Record, response: Optional[Plan.Response]) -> None:
    """Record a plan's answer (None: the call was dropped when the context went away)."""
    if response is not None:
        record.answers.append((time.monotonic(), STATUS_NAMES[response.action.status]))


def _run_goals(caller: ExecuteCaller, records: list[Record], stop: threading.Event) -> None:
    """Send, cancel and collect every execute goal from this one thread (rclpy 9.1 race)."""
    waiting = list(records)
    active: list[dict] = []
    finished: list[dict] = []
    while (waiting or active) and not stop.is_set():
        now = time.monotonic()
        while waiting and waiting[0].planned <= now:
            record = waiting.pop(0)
            goal_id = UUID(uuid=list(uuid.uuid4().bytes))
            record.key, record.sent = bytes(goal_id.uuid).hex(), time.monotonic()
            active.append({'record': record, 'id': goal_id, 'handle': None,
                           'sent': caller.send(Execute.Goal(
                               goal=record.text, latency_budget_ms=record.budget_ms,
                               max_tokens=record.max_tokens, context_json=record.context_json),
                               goal_id)})
        for goal in list(active):
            record = goal['record']
            if goal['handle'] is None and goal['sent'].done():
                goal['handle'] = goal['sent'].result()
                if not goal['handle'].accepted:  # refused at the door: that is its answer
                    record.answers.append((now, 'GOAL_REJECTED'))
                    active.remove(goal)
                    continue
                goal['handle'].get_result_async().add_done_callback(
                    lambda f, r=record: _goal_done(f, r))
            if goal['handle'] is not None and record.cancel_after_s is not None and \
                    not record.canceled and now >= record.sent + record.cancel_after_s:
                goal['handle'].cancel_goal_async()
                record.canceled = True
            if record.answers:
                finished.append(goal)
                active.remove(goal)
            elif now > record.deadline + LOST_AFTER_S:
                active.remove(goal)
        caller.executor.spin_once(timeout_sec=0.005)
    # Feedback after the result, judged by the server's timestamps once every status is in.
    keys = [bytes(goal['id'].uuid) for goal in finished]
    caller.spin_until(lambda: all(k in caller.terminal for k in keys), 10.0)
    for goal, key in zip(finished, keys, strict=True):
        if key in caller.terminal:
            goal['record'].feedback_after_result = len(caller.feedback_after_result(goal['id']))


def _goal_done(future, record: Record) -> None:
    wrapped = future.result()
    record.goal_status = wrapped.status
    record.answers.append((time.monotonic(), STATUS_NAMES[wrapped.result.action.status]))


class Chaos:
    """Disturbs the node's lifecycle at random moments from its own thread."""

    def __init__(self, node: NemotronNode, period_s: float, rng: random.Random) -> None:
        self.node = node
        self.period_s = period_s
        self.rng = rng
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name='chaos')

    def _step(self, name: str, trigger) -> None:
        self.counts[name] += 1
        result = trigger()
        if result != SUCCESS:
            self.failures.append(f'{name}: {result}')

    def _run(self) -> None:
        node = self.node
        while not self.stop.wait(self.rng.expovariate(1.0 / self.period_s)):
            self._step('deactivate', node.trigger_deactivate)
            if self.rng.random() < 0.4:
                self._step('cleanup', node.trigger_cleanup)
                self._step('configure', node.trigger_configure)
            self.stop.wait(self.rng.uniform(0.0, 0.5))
            self._step('activate', node.trigger_activate)


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)

    def q(p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))]

    return {'p50': q(0.5), 'p90': q(0.9), 'p99': q(0.99), 'max': values[-1]}


def _report(records: list[Record], caller: ExecuteCaller, chaos: Chaos, crashes: int,
            args: argparse.Namespace, duration_s: float) -> dict:
    answered = [r for r in records if r.answers and r.answers[0][0] <= r.deadline + LOST_AFTER_S]
    late = [r for r in answered if r.answers[0][0] > r.deadline + LATE_AFTER_S]
    duplicated = [r for r in records if len(r.answers) > 1 or (
        r.kind == 'execute' and len(caller.terminal_states.get(bytes.fromhex(r.key or ''), ()))
        > 1)]
    statuses = {kind: dict(Counter(r.answers[0][1] for r in answered if r.kind == kind))
                for kind in KINDS}
    return {
        'model': args.model, 'machine': platform.platform(), 'processor': platform.processor(),
        'settings': {k: v for k, v in vars(args).items() if k != 'out'},
        'duration_s': duration_s,
        'counts': {
            'requests': len(records), 'sent': sum(r.sent > 0 for r in records),
            'answered': len(answered), 'lost': len(records) - len(answered),
            'duplicated': len(duplicated), 'late': len(late),
            'feedback_after_result': sum(r.feedback_after_result > 0 for r in records),
            'canceled_goals': sum(r.canceled for r in records),
            'hostile': sum(bool(r.context_json) for r in records),
            'hostile_not_refused': sum(bool(r.context_json) and bool(r.answers) and r.answers[0][1]
                                       not in ('INVALID_REQUEST', 'INACTIVE', 'GOAL_REJECTED')
                                       for r in records),
            'crashes': crashes, 'restarts': 0,
        },
        'statuses': statuses,
        'lateness_ms': _quantiles([(r.answers[0][0] - r.deadline) * 1000 for r in answered]),
        'late_examples': [asdict(r) for r in late[:10]],
        'transitions': dict(chaos.counts), 'transition_failures': chaos.failures,
        'records': [asdict(r) for r in records],
    }


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    rng = random.Random(args.seed)
    model = model_by_name(args.model, tempfile.mkdtemp(prefix='bench_reliability_'))
    ros = RosHarness()
    node = NemotronNode(context=ros.context, parameter_overrides=node_params(
        model, max_tokens=LONG_GOAL_TOKENS, queue_size=args.queue_size,
        default_budget_ms=args.budget_max_ms))
    ros.add(node)
    assert node.trigger_configure() == SUCCESS and node.trigger_activate() == SUCCESS
    client = Client(ros)
    caller = ExecuteCaller(ros)
    records = _schedule(args, rng)
    by_id = {f'rel-{r.index}': r for r in records if r.kind == 'command'}

    def on_action(msg: Action) -> None:
        if msg.request_id in by_id:
            by_id[msg.request_id].answers.append((time.monotonic(), STATUS_NAMES[msg.status]))

    client.node.create_subscription(Action, 'actions', on_action, DEEP_QOS)
    if not caller.ready(10.0):
        raise SystemExit('the execute action server did not appear')
    chaos = Chaos(node, args.transition_period_s, random.Random(args.seed + 1))
    stop = threading.Event()
    topics = threading.Thread(target=_send_topics_and_plans, name='topics', args=(
        client, [r for r in records if r.kind != 'execute'], stop))
    goals = threading.Thread(target=_run_goals, name='goals', args=(
        caller, [r for r in records if r.kind == 'execute'], stop))
    started = time.monotonic()
    crashes = 0
    chaos.thread.start()
    topics.start()
    goals.start()

    def pending() -> bool:
        now = time.monotonic()
        return any(r.sent and not r.answers and now <= r.deadline + LOST_AFTER_S
                   for r in records if r.kind != 'execute')

    while topics.is_alive() or goals.is_alive() or pending():
        if not ros._thread.is_alive():  # an exception escaped a callback: the node is gone
            crashes = 1
            break
        time.sleep(0.1)
    stop.set()
    chaos.stop.set()
    for thread in (topics, goals, chaos.thread):
        thread.join(60.0)
    duration = time.monotonic() - started
    report = _report(records, caller, chaos, crashes, args, duration)
    node.close()
    ros.close()
    out = Path(args.out).with_suffix('.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ('counts', 'statuses', 'lateness_ms', 'transitions',
                                             'transition_failures', 'duration_s')}, indent=2))
    print(f'wrote {out}')
    return 0 if report['counts']['crashes'] == 0 and report['counts']['lost'] == 0 else 1


if __name__ == '__main__':
    raise SystemExit(main())
