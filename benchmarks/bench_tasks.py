#!/usr/bin/env python3
"""Benchmark multi-step tasks: model time, waiting for results, node overhead, prefix reuse.

A 3-step task (``plan`` with ``max_steps`` 3, ``tool_choice`` required, one call per step)
runs through a nemotron_node in this process over DDS, against an executor node that answers
every call on ``tool_calls`` at once with a ToolResult on ``tool_results``. The executor and
the ``plan`` client run in a second process, as on a robot (in this one, their callbacks
took the node's GIL). Per model (the tiny random nemotron_h and SmolLM2-135M, both through
llama.cpp, greedy, one thread):

1. Time per step, split. The node's backend is wrapped to time each generation (model time);
   the node's call release and the task manager's ``tool_result`` are wrapped to stamp when
   a call is about to be published and when its result arrives. Per step: model time;
   waiting for results (generation end -> the step's last result in the node: the call
   released, out over DDS, the executor, the result back); the node's next-step work
   (result in -> the next generation starts: render, count, submit, schedule); and the
   request and answer legs of the ``plan`` call around the first and last step.
2. Node overhead per step. The generation requests the node ran are replayed straight into
   the backend's ``generate`` (same prompts, same sampling, so the same tokens), interleaved
   with the node runs, alternating which goes first. Overhead of a task = its ``plan`` round
   trip - the sum of the direct generations; per step = that / 3 (goal: <= 5 ms). The
   per-step samples split the task at each generation's end, so they add up to it. With a
   model whose steps take seconds, run-to-run noise of the generations swamps milliseconds,
   so the report also gives, within each node run, the time outside its generations per
   step (and how much of that the executor round trips took). The calls' time in transit
   (published -> result in the node: DDS both ways and the executor) is the waiting the
   node does not spend; ``overhead_without_transit`` is the overhead without it.
3. Prompt tokens evaluated per step with and without prefix reuse: the same task on a node
   with ``prefix_cache`` true (the fixed prefix's state, and a step continues the last one's
   where the model allows: see the llama.cpp backend) and one with it false
   (``prompt_tokens - prompt_tokens_reused`` of each step's Action), with the model time per
   step under both (one task; that node skips the warm-up). No observations are published, so
   the world state the steps show does not change between them.

Needs the built package (``source tools/env.sh``). Writes JSON and a PNG to
benchmarks/results/ (about 2-3 minutes with the defaults on a 2-core machine).

    python benchmarks/bench_tasks.py                      # both models (20 and 4 reps)
    python benchmarks/bench_tasks.py --models smollm2 --reps 10
    python benchmarks/bench_tasks.py --node-executor multi --out /tmp/bench_tasks_multi
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import platform
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import rclpy
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from nemotron_ros.msg import Action, ToolCall, ToolResult
from nemotron_ros.node import COMMAND_QOS, NemotronNode
from nemotron_ros.srv import Plan
from nemotron_ros.testing.models import model_by_name

ROOT = Path(__file__).resolve().parents[1]
STATUS = {getattr(Action, n): n[len('STATUS_'):] for n in dir(Action) if n.startswith('STATUS_')}
GOAL = 'Check the battery three times, one call per step.'
#: get_battery takes no arguments: every constrained answer is a valid call, for any model.
TOOLS = ['get_battery']
STEPS = 3
GOAL_MS_PER_STEP = 5.0
N_CTX = 8192
TINY_REPS, REPS = 20, 4


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['tiny_nemotron_h', 'smollm2'],
                        help="'tiny_nemotron_h', 'smollm2' or GGUF paths")
    parser.add_argument('--reps', type=int, default=None,
                        help='measured tasks per model, each also replayed directly '
                        f'(default: {TINY_REPS} on the tiny model, {REPS} on the others)')
    parser.add_argument('--node-executor', choices=('single', 'multi'), default='single',
                        help="the node's rclpy executor: 'single' = SingleThreadedExecutor as "
                        "nemotron_node runs it, 'multi' = MultiThreadedExecutor(4) for comparison")
    parser.add_argument('--gc-freeze', choices=('true', 'false'), default='true',
                        help="the node's gc_freeze parameter (default true, as the node's)")
    parser.add_argument('--n-threads', type=int, default=1)
    parser.add_argument('--max-tokens', type=int, default=48)
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'bench_tasks'))
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error('--reps must be >= 1')
    return args


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float('nan')


class Recorder:
    """Stamps, in the monotonic clock, of what one task run did inside the node."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generations: list[tuple[float, float, Any, Any]] = []  # start, end, request, result
        self.results_in: list[float] = []
        self.released: list[float] = []

    def clear(self) -> None:
        with self.lock:
            self.generations, self.results_in, self.released = [], [], []


def _instrument(node: NemotronNode, recorder: Recorder):
    """Stamp the node's generations, released calls (just before they are published on
    ``tool_calls``) and arriving results (as the task manager takes them).

    Returns the unwrapped ``generate`` for the direct runs.
    """
    backend = node._engine.backend
    original = backend.generate

    def generate(request):
        start = time.monotonic()
        result = original(request)
        end = time.monotonic()
        with recorder.lock:
            recorder.generations.append((start, end, request, result))
        return result

    tasks = node._tasks
    tool_result = tasks.tool_result

    def stamped_tool_result(*args, **kwargs):
        with recorder.lock:
            recorder.results_in.append(time.monotonic())
        return tool_result(*args, **kwargs)

    release = node._release

    def stamped_release(call):
        with recorder.lock:
            recorder.released.append(time.monotonic())
        return release(call)

    backend.generate = generate
    tasks.tool_result = stamped_tool_result
    node._release = stamped_release
    return original


class InstantExecutor(Node):
    """Answers every call on ``tool_calls`` at once with a successful ToolResult."""

    def __init__(self) -> None:
        super().__init__(f'bench_tasks_executor_{uuid.uuid4().hex[:6]}')
        self.calls_seen: list[float] = []
        self.results_sent: list[float] = []
        self.results = self.create_publisher(ToolResult, 'tool_results', COMMAND_QOS)
        self.create_subscription(ToolCall, 'tool_calls', self._on_call, COMMAND_QOS)

    def _on_call(self, call: ToolCall) -> None:
        seen = time.monotonic()
        self.results.publish(ToolResult(request_id=call.request_id, call_id=call.id,
                                        name=call.name, success=True,
                                        content_json='{"percent": 73, "charging": false}'))
        self.calls_seen.append(seen)
        self.results_sent.append(time.monotonic())


def _plan(client, max_tokens: int) -> tuple[Plan.Response, float, float]:
    """One task through the ``plan`` service; returns the response and its call/answer stamps."""
    request = Plan.Request(goal=GOAL, allowed_tools=TOOLS, max_steps=STEPS,
                           latency_budget_ms=120000, max_tokens=max_tokens)
    done = threading.Event()
    start = time.monotonic()
    future = client.call_async(request)
    future.add_done_callback(lambda _f: done.set())
    if not done.wait(300.0):
        raise RuntimeError('plan did not answer within 300 s')
    end = time.monotonic()
    response = future.result()
    actions = [*response.steps, response.action]
    problems = [f'step {a.step}: {STATUS[a.status]} {a.status_message}' for a in actions
                if a.status != Action.STATUS_OK]
    if len(actions) != STEPS or problems or not response.action.final:
        raise RuntimeError(f'the task did not take {STEPS} OK steps: {len(actions)} Actions, '
                           f'{problems}')
    return response, start, end


def _peer_main(conn) -> None:
    """The robot's side, in a process of its own: the ``plan`` client and the executor.

    On a robot they run in other processes, so their callbacks never take the node's GIL;
    sharing the node's process added their Python time to the node's overhead. Commands come
    over ``conn``: ``('ready',)`` waits until the node's service and subscription are matched,
    ``('plan', max_tokens)`` runs one task, ``('close',)`` ends. Stamps are
    ``time.monotonic()``, the same system-wide clock the node's process reads.
    """
    rclpy.init()
    executor = SingleThreadedExecutor()
    client_node = Node(f'bench_tasks_client_{uuid.uuid4().hex[:6]}')
    tools = InstantExecutor()
    for node in (client_node, tools):
        executor.add_node(node)
    client = client_node.create_client(Plan, 'plan')
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        while True:
            command, *rest = conn.recv()
            try:
                if command == 'close':
                    return
                if command == 'ready':
                    conn.send(('ok', _peer_ready(client, tools)))
                    continue
                tools.calls_seen.clear()
                tools.results_sent.clear()
                response, start, end = _plan(client, *rest)
                actions = [{name: getattr(a, name) for name in (
                    'step', 'prompt_tokens', 'prompt_tokens_reused', 'completion_tokens')}
                    for a in (*response.steps, response.action)]
                conn.send(('ok', {'start': start, 'end': end, 'actions': actions,
                                  'calls_seen': list(tools.calls_seen),
                                  'results_sent': list(tools.results_sent)}))
            except Exception as exc:
                conn.send(('error', f'{type(exc).__name__}: {exc}'))
    finally:
        executor.shutdown(timeout_sec=2.0)
        rclpy.try_shutdown()


def _peer_ready(client, tools: InstantExecutor) -> bool:
    if not client.wait_for_service(timeout_sec=30.0):
        raise RuntimeError('plan service did not appear')
    end = time.monotonic() + 30.0
    while tools.results.get_subscription_count() == 0:
        if time.monotonic() > end:
            raise RuntimeError('the node never subscribed tool_results')
        time.sleep(0.05)
    return True


class Peer:
    """The process running :func:`_peer_main`, driven from the node's process."""

    def __init__(self) -> None:
        context = multiprocessing.get_context('spawn')
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_peer_main, args=(child,), daemon=True)
        self._process.start()

    def call(self, *command: Any) -> Any:
        self._conn.send(command)
        if not self._conn.poll(330.0):
            raise RuntimeError(f'the executor process did not answer {command[0]!r}')
        status, value = self._conn.recv()
        if status != 'ok':
            raise RuntimeError(f'executor process: {value}')
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send(('close',))
        self._process.join(10.0)
        if self._process.is_alive():
            self._process.kill()


def _node_run(peer: Peer, recorder: Recorder, max_tokens: int) -> dict:
    """One task through the node; its per-step split and the generation requests it ran."""
    recorder.clear()
    reply = peer.call('plan', max_tokens)
    start, end, actions = reply['start'], reply['end'], reply['actions']
    calls_seen, results_sent = reply['calls_seen'], reply['results_sent']
    with recorder.lock:  # every stamp precedes the answer: step k+1 waits for k's result
        generations = list(recorder.generations)
        results_in = list(recorder.results_in)
        released = list(recorder.released)
    if (len(generations) != STEPS or len(results_in) != STEPS - 1
            or len(released) != STEPS - 1 or len(calls_seen) != STEPS - 1):
        raise RuntimeError(f'{len(generations)} generations, {len(calls_seen)} calls and '
                           f'{len(results_in)} results for a {STEPS}-step task')
    gen_start = [g[0] for g in generations]
    gen_end = [g[1] for g in generations]
    bounds = [start, *gen_end[:-1], end]  # the per-step segments add up to the round trip
    return {
        'total_ms': (end - start) * 1000,
        'segment_ms': [(bounds[k + 1] - bounds[k]) * 1000 for k in range(STEPS)],
        'model_ms': [(e - s) * 1000 for s, e in zip(gen_start, gen_end, strict=True)],
        'waiting_for_results_ms': [(results_in[k] - gen_end[k]) * 1000
                                   for k in range(STEPS - 1)],
        'call_out_ms': [(calls_seen[k] - gen_end[k]) * 1000 for k in range(STEPS - 1)],
        'call_released_ms': [(released[k] - gen_end[k]) * 1000 for k in range(STEPS - 1)],
        'result_back_ms': [(results_in[k] - results_sent[k]) * 1000 for k in range(STEPS - 1)],
        'result_in_after_release_ms': [(results_in[k] - released[k]) * 1000
                                       for k in range(STEPS - 1)],
        'next_step_ms': [(gen_start[k + 1] - results_in[k]) * 1000 for k in range(STEPS - 1)],
        'request_leg_ms': (gen_start[0] - start) * 1000,
        'answer_leg_ms': (end - gen_end[-1]) * 1000,
        'prompt_tokens': [a['prompt_tokens'] for a in actions],
        'prompt_tokens_reused': [a['prompt_tokens_reused'] for a in actions],
        'completion_tokens': [a['completion_tokens'] for a in actions],
        'requests': [g[2] for g in generations],
    }


def _direct_run(generate, requests: list) -> dict:
    """The same generation requests straight into the backend, one after the other."""
    model_ms, completion = [], []
    for request in requests:
        request = dataclasses.replace(request, deadline=None, cancel=None, on_token=None)
        start = time.monotonic()
        result = generate(request)
        model_ms.append((time.monotonic() - start) * 1000)
        completion.append(result.usage.completion_tokens)
    return {'model_ms': model_ms, 'completion_tokens': completion}


class Bench:
    """One nemotron_node at a time in this process, and the robot's side in another one.

    The nemotron_node spins in its own executor (single-threaded, as ``nemotron_node`` runs it,
    unless ``--node-executor multi``). The ``plan`` client and the instant executor run in a
    :class:`Peer` process, as they would on a robot.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.recorder = Recorder()
        self.node_executor = (MultiThreadedExecutor(num_threads=4)
                              if args.node_executor == 'multi' else SingleThreadedExecutor())
        threading.Thread(target=self.node_executor.spin, daemon=True).start()
        self.peer = Peer()

    def start_node(self, model: str, prefix_cache: bool) -> tuple[NemotronNode, Any]:
        """An active node on ``model``; without prefix reuse it skips the warm-up (slow, and
        only the token counts and model times of one task are wanted from it)."""
        # The tiny model's tokenizer spends ~3x SmolLM2's tokens on the same prompt: room
        # for three steps of it.
        values = {'model_path': model, 'n_threads': self.args.n_threads, 'temperature': 0.0,
                  'tool_choice': 'required', 'max_tool_calls': 1, 'n_ctx': N_CTX,
                  'max_task_tokens': N_CTX - self.args.max_tokens,
                  'max_tokens': self.args.max_tokens, 'prefix_cache': prefix_cache,
                  'warm_up': prefix_cache, 'gc_freeze': self.args.gc_freeze == 'true'}
        node = NemotronNode(f'nemotron_bench_{uuid.uuid4().hex[:6]}', parameter_overrides=[
            Parameter(k, value=v) for k, v in values.items()])
        self.node_executor.add_node(node)
        node.trigger_configure()
        node.trigger_activate()
        generate = _instrument(node, self.recorder)
        self.peer.call('ready')
        return node, generate

    def stop_node(self, node: NemotronNode) -> None:
        node.close()
        self.node_executor.remove_node(node)
        node.destroy_node()

    def close(self) -> None:
        self.peer.close()
        self.node_executor.shutdown(timeout_sec=2.0)


def _measure(bench: Bench, name: str, model: str) -> dict:
    """Interleaved node and direct runs (prefix cache on), then one task with it off."""
    args = bench.args
    reps = args.reps or (TINY_REPS if name == 'tiny_nemotron_h' else REPS)
    node, generate = bench.start_node(model, prefix_cache=True)
    try:
        warm = _node_run(bench.peer, bench.recorder, args.max_tokens)  # not measured
        requests = warm['requests']
        node_runs, direct_runs = [], []
        for rep in range(reps):
            if rep % 2:  # alternate which goes first
                direct_runs.append(_direct_run(generate, requests))
                node_runs.append(_node_run(bench.peer, bench.recorder, args.max_tokens))
            else:
                node_runs.append(_node_run(bench.peer, bench.recorder, args.max_tokens))
                direct_runs.append(_direct_run(generate, requests))
    finally:
        bench.stop_node(node)
    node_off, _generate = bench.start_node(model, prefix_cache=False)
    try:
        no_reuse = _node_run(bench.peer, bench.recorder, args.max_tokens)
    finally:
        bench.stop_node(node_off)
    return _summary(node_runs, direct_runs, warm, no_reuse)


def _summary(node_runs: list[dict], direct_runs: list[dict], reuse: dict,
             no_reuse: dict) -> dict:
    def per_step(runs: list[dict], key: str, steps: int = STEPS) -> list[float]:
        return [_median([r[key][k] for r in runs]) for k in range(steps)]

    overhead_samples = [n['segment_ms'][k] - d['model_ms'][k]
                        for n, d in zip(node_runs, direct_runs, strict=True) for k in range(STEPS)]
    per_task = [(n['total_ms'] - sum(d['model_ms'])) / STEPS
                for n, d in zip(node_runs, direct_runs, strict=True)]
    overhead = _median(per_task)
    slower = [n['model_ms'][k] - d['model_ms'][k]
              for n, d in zip(node_runs, direct_runs, strict=True) for k in range(STEPS)]
    outside = [(r['total_ms'] - sum(r['model_ms'])) / STEPS for r in node_runs]
    # Calls in transit: published -> the result is in the node (DDS both ways and the
    # executor); the rest of a step's waiting is the node's own work before publishing.
    transit = [sum(r['result_in_after_release_ms']) / STEPS for r in node_runs]
    direct_totals = [sum(d['model_ms']) for d in direct_runs]
    round_trips = [sum(r['waiting_for_results_ms']) / STEPS for r in node_runs]
    return {
        'reps': len(node_runs),
        'steps': {
            'model_ms': per_step(node_runs, 'model_ms'),
            'waiting_for_results_ms': per_step(node_runs, 'waiting_for_results_ms', STEPS - 1),
            'call_out_ms': per_step(node_runs, 'call_out_ms', STEPS - 1),
            'call_released_ms': per_step(node_runs, 'call_released_ms', STEPS - 1),
            'result_back_ms': per_step(node_runs, 'result_back_ms', STEPS - 1),
            'next_step_ms': per_step(node_runs, 'next_step_ms', STEPS - 1),
            'request_leg_ms': _median([r['request_leg_ms'] for r in node_runs]),
            'answer_leg_ms': _median([r['answer_leg_ms'] for r in node_runs]),
            'completion_tokens': node_runs[0]['completion_tokens'],
        },
        'overhead': {
            'node_task_median_ms': _median([r['total_ms'] for r in node_runs]),
            'direct_task_median_ms': _median(direct_totals),
            'overhead_per_step_median_ms': overhead,
            'overhead_per_step_by_step_median_ms': [
                _median(overhead_samples[k::STEPS]) for k in range(STEPS)],
            # Of the overhead: the same generation's time in the node minus directly.
            'generation_in_node_minus_direct_median_ms': _median(slower),
            # Within each node run (no run-to-run model noise): the task's time outside its
            # generations per step, and the part of it spent on the executor round trips.
            'outside_generation_per_step_median_ms': _median(outside),
            'executor_round_trips_per_step_median_ms': _median(round_trips),
            'calls_in_transit_per_step_median_ms': _median(transit),
            # The node's own time per step: the overhead without the calls in transit.
            'overhead_without_transit_per_step_median_ms': _median(
                [p - t for p, t in zip(per_task, transit, strict=True)]),
            'goal_ms_per_step': GOAL_MS_PER_STEP,
            'goal_met': overhead <= GOAL_MS_PER_STEP,
            # How much the direct runs alone vary per step: when it is larger than the goal,
            # the comparison above cannot tell; see outside_generation_per_step_median_ms.
            'direct_spread_per_step_ms': (max(direct_totals) - min(direct_totals)) / STEPS,
            'same_token_counts': all(n['completion_tokens'] == d['completion_tokens']
                                     for n, d in zip(node_runs, direct_runs, strict=True)),
            'per_task_ms_per_step': per_task,
            'samples_ms': overhead_samples,
        },
        'prefix_reuse': {
            'prompt_tokens': reuse['prompt_tokens'],
            'evaluated_with_reuse': [p - r for p, r in zip(
                reuse['prompt_tokens'], reuse['prompt_tokens_reused'], strict=True)],
            'evaluated_without_reuse': [p - r for p, r in zip(
                no_reuse['prompt_tokens'], no_reuse['prompt_tokens_reused'], strict=True)],
            'model_ms_with_reuse': per_step(node_runs, 'model_ms'),
            'model_ms_without_reuse': no_reuse['model_ms'],
        },
    }


def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    models = list(report['models'])
    figure, axes = plt.subplots(len(models), 3, figsize=(14, 3.6 * len(models)), squeeze=False)
    for row, name in zip(axes, models, strict=True):
        data = report['models'][name]
        steps = data['steps']
        index = list(range(STEPS))
        waiting = [*steps['waiting_for_results_ms'], 0.0]
        node = [steps['request_leg_ms'], *steps['next_step_ms']]
        node[-1] += steps['answer_leg_ms']
        row[0].bar(index, steps['model_ms'], label='model')
        row[0].bar(index, waiting, bottom=steps['model_ms'], label='waiting for results')
        base = [m + w for m, w in zip(steps['model_ms'], waiting, strict=True)]
        row[0].bar(index, node, bottom=base, label='node (request, next step, answer)')
        row[0].set_xticks(index, [f'step {k}' for k in index])
        row[0].set_ylabel('ms (median)')
        row[0].set_title(f"{name}: time per step ({report['node_executor']}-threaded "
                         'node executor)')
        row[0].legend(fontsize=7)
        overhead = data['overhead']
        row[1].boxplot([overhead['samples_ms'][k::STEPS] for k in index])
        row[1].axhline(GOAL_MS_PER_STEP, color='k', linestyle='--', linewidth=0.8,
                       label=f'goal {GOAL_MS_PER_STEP:.0f} ms')
        row[1].set_xticks([k + 1 for k in index], [f'step {k}' for k in index])
        row[1].set_yscale('symlog', linthresh=10.0)  # ms-scale boxes, outliers in view
        row[1].set_ylabel('node - direct (ms)')
        row[1].set_title(f"overhead {overhead['overhead_per_step_median_ms']:.2f} ms/step "
                         '(median)')
        row[1].legend(fontsize=7)
        reuse = data['prefix_reuse']
        width = 0.4
        row[2].bar([k - width / 2 for k in index], reuse['evaluated_without_reuse'], width,
                   label='prefix_cache false')
        row[2].bar([k + width / 2 for k in index], reuse['evaluated_with_reuse'], width,
                   label='prefix_cache true')
        row[2].set_xticks(index, [f'step {k}' for k in index])
        row[2].set_ylabel('prompt tokens evaluated')
        row[2].set_title('prefix reuse')
        row[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    scratch = Path(tempfile.mkdtemp(prefix='bench_tasks_'))
    rclpy.init()
    bench = Bench(args)
    report: dict[str, Any] = {
        'goal': GOAL, 'tools': TOOLS, 'steps': STEPS, 'n_threads': args.n_threads,
        'node_executor': args.node_executor, 'gc_freeze': args.gc_freeze == 'true',
        'max_tokens': args.max_tokens, 'machine': platform.platform(),
        'processor': platform.processor(), 'models': {}}
    started = time.monotonic()
    try:
        for name in args.models:
            model = model_by_name(name, scratch)
            report['models'][name] = {'model_path': model, **_measure(bench, name, model)}
    finally:
        bench.close()
        rclpy.try_shutdown()
    report['wall_s'] = time.monotonic() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(report, indent=2))
    _plot(report, out.with_suffix('.png'))
    for name, data in report['models'].items():
        overhead = {k: v for k, v in data['overhead'].items()
                    if k not in ('samples_ms', 'per_task_ms_per_step')}
        print(json.dumps({name: {'steps': data['steps'], 'overhead': overhead,
                                 'prefix_reuse': data['prefix_reuse']}}, indent=2))
    print(f'{report["wall_s"]:.0f} s; wrote {out.with_suffix(".json")} and '
          f'{out.with_suffix(".png")}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
