#!/usr/bin/env python3
"""Benchmark how fast a message reaches the node's callback under each rclpy executor.

A publisher in this process sends ``ToolResult`` messages (unknown request ids: the task
manager counts and drops them) to an active ``NemotronNode`` (tiny nemotron_h, no warm-up)
spun by a ``SingleThreadedExecutor`` or a ``MultiThreadedExecutor(4)`` (what
``nemotron_node`` runs). The latency is publish -> the task manager's ``tool_result``
call, one message at a time (the next one 3 ms after the previous arrived). Rounds alternate
the executors; each round is a fresh node and reports median, 90th percentile and maximum.

Needs the built package (``source tools/env.sh``). Writes JSON (about 1 minute):

    python benchmarks/bench_executor.py
    python benchmarks/bench_executor.py --rounds 6 --messages 300
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import rclpy
from rclpy.executors import Executor, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from nemotron_ros.msg import ToolResult
from nemotron_ros.node import COMMAND_QOS, NemotronNode
from nemotron_ros.testing.models import model_by_name

ROOT = Path(__file__).resolve().parents[1]
EXECUTORS = {'single': SingleThreadedExecutor,
             'multi4': lambda: MultiThreadedExecutor(num_threads=4)}


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=4, help='rounds per executor')
    parser.add_argument('--messages', type=int, default=200, help='messages per round')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' /
                                               'bench_executor.json'))
    return parser.parse_args(argv)


def _round(kind: str, model: str, messages: int) -> dict:
    """One fresh node under ``kind``: latencies of ``messages`` messages, in ms."""
    executor: Executor = EXECUTORS[kind]()
    node = NemotronNode(f'bench_executor_{uuid.uuid4().hex[:6]}', parameter_overrides=[
        Parameter('model_path', value=model), Parameter('warm_up', value=False)])
    executor.add_node(node)
    node.trigger_configure()
    node.trigger_activate()
    arrived = threading.Event()
    stamp = [0.0]
    take = node._tasks.tool_result

    def stamped(*args, **kwargs):
        stamp[0] = time.perf_counter()
        arrived.set()
        return take(*args, **kwargs)

    node._tasks.tool_result = stamped
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    sender = Node(f'bench_executor_sender_{uuid.uuid4().hex[:6]}')
    publisher = sender.create_publisher(ToolResult, 'tool_results', COMMAND_QOS)
    try:
        end = time.monotonic() + 10.0
        while publisher.get_subscription_count() == 0:
            if time.monotonic() > end:
                raise RuntimeError('the node never subscribed tool_results')
            time.sleep(0.01)
        latencies, lost = [], 0
        for index in range(messages):
            arrived.clear()
            sent = time.perf_counter()
            publisher.publish(ToolResult(request_id='bench', call_id=str(index)))
            if arrived.wait(2.0):
                latencies.append((stamp[0] - sent) * 1000.0)
            else:
                lost += 1
            time.sleep(0.003)
    finally:
        executor.shutdown(timeout_sec=2.0)
        node.close()
        node.destroy_node()
        sender.destroy_node()
    return {'median_ms': statistics.median(latencies),
            'p90_ms': statistics.quantiles(latencies, n=10)[-1],
            'max_ms': max(latencies), 'not_within_2_s': lost}


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    rclpy.init()
    started = time.monotonic()
    try:
        model = model_by_name('tiny_nemotron_h', tempfile.mkdtemp(prefix='bench_executor_'))
        rounds: dict[str, list[dict]] = {kind: [] for kind in EXECUTORS}
        for index in range(args.rounds):
            order = list(EXECUTORS) if index % 2 == 0 else list(reversed(EXECUTORS))
            for kind in order:
                result = _round(kind, model, args.messages)
                rounds[kind].append(result)
                print(f'{kind:7s} round {index}: median {result["median_ms"]:.2f} ms, '
                      f'p90 {result["p90_ms"]:.2f} ms, max {result["max_ms"]:.1f} ms',
                      flush=True)
    finally:
        rclpy.try_shutdown()
    report = {
        'what': 'publish(ToolResult) -> NemotronNode task manager, one message at a time',
        'messages_per_round': args.messages, 'machine': platform.platform(),
        'rounds': rounds,
        'median_of_round_medians_ms': {k: statistics.median(r['median_ms'] for r in v)
                                       for k, v in rounds.items()},
        'worst_ms': {k: max(r['max_ms'] for r in v) for k, v in rounds.items()},
        'wall_s': time.monotonic() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f'median of round medians: {report["median_of_round_medians_ms"]}; worst: '
          f'{report["worst_ms"]}; wrote {out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
