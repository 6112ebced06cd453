#!/usr/bin/env python3
"""Benchmark the node: its overhead over the bare engine, and deadlines under concurrent callers.

1. Overhead. The same prompt goes (a) through the `plan` service of a running nemotron_node
   (client -> DDS -> node -> scheduler -> backend -> DDS -> client) and (b) straight into the
   backend's ``generate`` with the identical generation request, interleaved, greedy, so both
   produce the same tokens. Reports medians and node/direct ratios.
2. Deadlines. Several client threads call `plan` concurrently with mixed budgets; each answer
   is timed where the caller receives it: share answered by the deadline, lateness
   distribution, outcomes per status, and lost answers (must be 0).

Needs the built package (``source tools/env.sh``). Writes JSON and a PNG to
benchmarks/results/.

    python benchmarks/bench_node.py                    # tiny nemotron_h
    python benchmarks/bench_node.py --model smollm2 --reps 10 --calls 60
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from nemotron_ros.engine.runtime import Prompt
from nemotron_ros.engine.scheduler import RequestKind
from nemotron_ros.msg import Action
from nemotron_ros.node import NemotronNode
from nemotron_ros.srv import Plan
from nemotron_ros.testing.models import model_by_name

ROOT = Path(__file__).resolve().parents[1]
STATUS = {getattr(Action, n): n[len('STATUS_'):] for n in dir(Action) if n.startswith('STATUS_')}
GOAL = 'Go to the kitchen and tell me when you are there.'
BUDGETS_MS = (100, 250, 500, 1000, 2000, 4000)


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='tiny_nemotron_h',
                        help="'tiny_nemotron_h', 'smollm2' or a GGUF path")
    parser.add_argument('--n-threads', type=int, default=1)
    parser.add_argument('--reps', type=int, default=15, help='overhead pairs')
    parser.add_argument('--max-tokens', type=int, default=32)
    parser.add_argument('--callers', type=int, default=4)
    parser.add_argument('--calls', type=int, default=120, help='deadline calls, all callers')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'bench_node'))
    return parser.parse_args(argv)


def _call(client, request: Plan.Request, timeout: float) -> tuple[Optional[Action], float]:
    """Call `plan`; returns the answer (None if lost) and the seconds until it arrived."""
    start = time.monotonic()
    future = client.call_async(request)
    event = threading.Event()
    future.add_done_callback(lambda _f: event.set())
    if not event.wait(timeout):
        return None, time.monotonic() - start
    return future.result().action, time.monotonic() - start


def _overhead(node: NemotronNode, client, args: argparse.Namespace) -> dict:
    engine = node._engine
    prompt = Prompt(text=GOAL, max_tokens=args.max_tokens, kind=RequestKind.SERVICE)
    request = Plan.Request(goal=GOAL, latency_budget_ms=60000, max_tokens=args.max_tokens)
    node_s, direct_s, node_tokens, direct_tokens = [], [], [], []
    for _ in range(args.reps):
        generation = engine.prepare(prompt)
        start = time.monotonic()
        result = engine.backend.generate(generation)
        direct_s.append(time.monotonic() - start)
        direct_tokens.append(result.usage.completion_tokens)
        action, elapsed = _call(client, request, 120.0)
        assert action is not None and action.status == Action.STATUS_OK, action
        node_s.append(elapsed)
        node_tokens.append(action.completion_tokens)
    node_median, direct_median = statistics.median(node_s), statistics.median(direct_s)
    return {
        'reps': args.reps, 'max_tokens': args.max_tokens,
        'completion_tokens': {'node': statistics.median(node_tokens),
                              'direct': statistics.median(direct_tokens)},
        'same_token_counts': node_tokens == direct_tokens,
        'node_median_ms': node_median * 1000, 'direct_median_ms': direct_median * 1000,
        'overhead_median_ms': (node_median - direct_median) * 1000,
        'node_over_direct': node_median / direct_median,
        'node_ms': [x * 1000 for x in node_s], 'direct_ms': [x * 1000 for x in direct_s],
    }


def _deadlines(client, args: argparse.Namespace) -> dict:
    records: list[dict] = []
    lock = threading.Lock()

    def caller(index: int) -> None:
        for n in range(index, args.calls, args.callers):
            budget = BUDGETS_MS[n % len(BUDGETS_MS)]
            request = Plan.Request(goal=f'{GOAL} (request {n})', latency_budget_ms=budget,
                                   priority=n % 3, max_tokens=args.max_tokens)
            action, elapsed = _call(client, request, budget / 1000.0 + 30.0)
            with lock:
                records.append({'budget_ms': budget, 'elapsed_ms': elapsed * 1000,
                                'status': STATUS[action.status] if action else 'LOST'})

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(args.callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lateness = sorted(r['elapsed_ms'] - r['budget_ms'] for r in records)
    on_time = sum(r['elapsed_ms'] <= r['budget_ms'] for r in records)

    def quantile(q: float) -> float:
        return lateness[min(len(lateness) - 1, int(q * len(lateness)))]

    return {
        'callers': args.callers, 'calls': args.calls, 'answered': len(records),
        'lost': sum(r['status'] == 'LOST' for r in records),
        'answered_by_deadline_share': on_time / len(records),
        'lateness_ms': {'p50': quantile(0.5), 'p90': quantile(0.9), 'p99': quantile(0.99),
                        'max': lateness[-1]},
        'statuses': dict(Counter(r['status'] for r in records)),
        'records': records,
    }


def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    overhead = report['overhead']
    left.boxplot([overhead['direct_ms'], overhead['node_ms']])
    left.set_xticks([1, 2], ['backend.generate', 'plan service'])
    left.set_ylabel('ms per request')
    left.set_title(f"node / direct = {overhead['node_over_direct']:.3f} (median)")
    records = report['deadlines']['records']
    for status in sorted({r['status'] for r in records}):
        points = [r for r in records if r['status'] == status]
        right.scatter([r['budget_ms'] for r in points], [r['elapsed_ms'] for r in points],
                      label=status, s=12)
    limit = max(BUDGETS_MS)
    right.plot([0, limit], [0, limit], 'k--', linewidth=0.8, label='deadline')
    right.set_xlabel('budget (ms)')
    right.set_ylabel('answer received after (ms)')
    right.set_title(f"{report['deadlines']['answered_by_deadline_share']:.1%} by deadline")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    scratch = Path(tempfile.mkdtemp(prefix='bench_node_'))
    model = model_by_name(args.model, scratch)
    rclpy.init()
    node = NemotronNode(parameter_overrides=[
        Parameter('model_path', value=model), Parameter('n_threads', value=args.n_threads),
        Parameter('temperature', value=0.0), Parameter('n_ctx', value=8192),
        Parameter('queue_size', value=16)])
    client_node = Node('bench_node_client')
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    executor.add_node(client_node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        node.trigger_configure()
        node.trigger_activate()
        client = client_node.create_client(Plan, 'plan')
        assert client.wait_for_service(timeout_sec=30.0)
        report = {'model': args.model, 'model_path': model, 'n_threads': args.n_threads,
                  'machine': platform.platform(), 'processor': platform.processor(),
                  'overhead': _overhead(node, client, args),
                  'deadlines': _deadlines(client, args)}
    finally:
        node.close()
        executor.shutdown(timeout_sec=2.0)
        rclpy.try_shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(report, indent=2))
    _plot(report, out.with_suffix('.png'))
    summary = {k: v for k, v in report['overhead'].items() if not k.endswith('_ms')}
    summary.update({k: v for k, v in report['deadlines'].items() if k != 'records'})
    print(json.dumps(summary, indent=2))
    print(f'wrote {out.with_suffix(".json")} and {out.with_suffix(".png")}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
