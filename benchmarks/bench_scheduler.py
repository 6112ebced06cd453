#!/usr/bin/env python3
"""Benchmark the latency-budgeted scheduler: is every request answered once and in time.

Several client threads submit a few hundred requests open-loop (they do not wait for answers,
so the queue fills and admission control, eviction and preemption all get exercised), with
mixed budgets, priorities, kinds and answer lengths, against a real backend: by default a tiny
random-weight ``nemotron_h`` GGUF through llama.cpp (the real hybrid code path), or SmolLM2,
or any GGUF file. Every outcome is timestamped when its callback fires.

Writes a JSON report (share answered by the deadline, lateness distribution, outcomes per
status, lost and duplicated answers, which must both be 0) and a PNG with the lateness
histogram, the outcomes per status and answer time against budget.

    python benchmarks/bench_scheduler.py                       # tiny nemotron_h
    python benchmarks/bench_scheduler.py --model smollm2 --requests 200
    python benchmarks/bench_scheduler.py --model /models/model.gguf --n-threads 4
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nemotron_ros.engine.scheduler import (  # noqa: E402
    Outcome,
    RequestKind,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
)
from nemotron_ros.engine.types import GenerationRequest, Message, SamplingParams  # noqa: E402
from nemotron_ros.engine.world_state import WORLD_STATE_NOTE, Observation, WorldState  # noqa: E402

BUDGETS_S = (0.05, 0.15, 0.3, 0.6, 1.2, 2.5)
MAX_TOKENS = (8, 16, 32, 64)
COMMANDS = (
    'Bring the red cup to the kitchen table.',
    'Stop and wait here.',
    'What is the battery level?',
    'Go to the charging dock.',
    'Is there a person near the door?',
    'Pick up the blue box and put it on the shelf.',
)


@dataclass
class Record:
    """One submitted request and what came back for it."""

    id: str
    client: int
    budget_s: float
    priority: int
    kind: str
    max_tokens: int
    submitted: float
    deadline: float
    answers: int = 0
    answered: Optional[float] = None
    status: Optional[str] = None
    message: str = ''
    total_s: Optional[float] = None
    completion_tokens: int = 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    backend, description = _load_backend(args)
    config = SchedulerConfig(max_queue=args.max_queue, min_new_tokens=args.min_new_tokens)
    world = _world_state()
    with Scheduler(backend, config) as scheduler:
        rates = scheduler.warm_up(rounds=3)
        print(f'warm-up: prefill {rates.prefill_tokens_per_s:.0f} tok/s, decode'
              f' {rates.decode_tokens_per_s:.0f} tok/s, overhead {rates.overhead_s * 1e3:.1f} ms')
        records = _run_clients(scheduler, world, args)
        stats = scheduler.stats()
    backend.unload()
    report = _report(records, stats, args, description, rates)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')
    _plot(records, report, out.with_suffix('.png'))
    _print_summary(report, out)
    return 0 if report['lost'] == 0 and report['duplicated'] == 0 else 1


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='tiny_nemotron_h',
                        help="'tiny_nemotron_h', 'smollm2', or the path of a GGUF file")
    parser.add_argument('--clients', type=int, default=4)
    parser.add_argument('--requests', type=int, default=300, help='total, over all clients')
    parser.add_argument('--mean-gap-ms', type=float, default=40.0,
                        help="mean pause between one client's submissions (exponential)")
    parser.add_argument('--max-queue', type=int, default=8)
    parser.add_argument('--min-new-tokens', type=int, default=8)
    parser.add_argument('--n-threads', type=int, default=1, help='llama.cpp threads')
    parser.add_argument('--n-ctx', type=int, default=2048)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' /
                                             'bench_scheduler.json'))
    return parser.parse_args(argv)


def _load_backend(args: argparse.Namespace):
    from nemotron_ros.engine.backends.llama.backend import LlamaBackend, LlamaConfig
    from nemotron_ros.engine.tools import ToolRegistry
    from nemotron_ros.testing import models

    if args.model == 'tiny_nemotron_h':
        path = models.tiny_nemotron_h_path(Path(tempfile.gettempdir()) / 'nemotron_ros_bench')
    elif args.model == 'smollm2':
        path = models.smollm2_gguf_path()
    else:
        path = Path(args.model)
    backend = LlamaBackend(LlamaConfig(model_path=str(path), n_ctx=args.n_ctx,
                                       n_threads=args.n_threads), ToolRegistry())
    info = backend.load()
    return backend, {'model': args.model, 'path': str(path), 'architecture': info.architecture,
                     'chat_format': info.chat_format, 'n_threads': args.n_threads}


def _world_state() -> WorldState:
    world = WorldState(max_observations=8, default_ttl_s=1e9)
    now = time.monotonic()
    for label, source in (('red cup', 'camera'), ('person', 'camera'), ('battery', 'bms')):
        world.update(Observation(source=source, label=label, stamp=now, confidence=0.9), now)
    return world


def _run_clients(scheduler: Scheduler, world: WorldState,
                 args: argparse.Namespace) -> list[Record]:
    records: list[Record] = []
    lock = threading.Lock()
    per_client = [args.requests // args.clients + (i < args.requests % args.clients)
                  for i in range(args.clients)]

    def client(index: int, count: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        for n in range(count):
            record, request = _make_request(rng, index, n, world)
            with lock:
                records.append(record)
            scheduler.submit(request, callback=lambda o, r=record: _record(r, o, lock))
            time.sleep(rng.expovariate(1000.0 / args.mean_gap_ms))

    threads = [threading.Thread(target=client, args=(i, c)) for i, c in enumerate(per_client)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end = time.monotonic() + max(BUDGETS_S) + 10.0
    while time.monotonic() < end and any(r.answers == 0 for r in records):
        time.sleep(0.05)
    return records


def _make_request(rng: random.Random, client: int, n: int,
                  world: WorldState) -> tuple[Record, ScheduledRequest]:
    budget = rng.choice(BUDGETS_S)
    priority = rng.choice((0, 0, 0, 1, 2, 5))
    kind = rng.choice((RequestKind.TOPIC, RequestKind.TOPIC, RequestKind.SERVICE,
                       RequestKind.ACTION))
    max_tokens = rng.choice(MAX_TOKENS)
    text = f'{world.render(time.monotonic())}\n{rng.choice(COMMANDS)}'
    generation = GenerationRequest(
        messages=[Message('system', f'You control a mobile robot. {WORLD_STATE_NOTE}'),
                  Message('user', text)],
        constrained=False, sampling=SamplingParams(max_tokens=max_tokens, seed=n))
    now = time.monotonic()
    request_id = f'c{client}-{n}'
    record = Record(request_id, client, budget, priority, kind.value, max_tokens, now,
                    now + budget)
    return record, ScheduledRequest(payload=generation, id=request_id, budget_s=budget,
                                    priority=priority, kind=kind, arrival=now)


def _record(record: Record, outcome: Outcome, lock: threading.Lock) -> None:
    answered = time.monotonic()
    with lock:
        record.answers += 1
        if record.answers > 1:
            return
        record.answered = answered
        record.status = outcome.status.name
        record.message = outcome.status_message
        record.total_s = outcome.total_s
        if outcome.result is not None:
            record.completion_tokens = outcome.result.usage.completion_tokens


def _report(records: list[Record], stats, args: argparse.Namespace, description: dict,
            rates) -> dict:
    answered = [r for r in records if r.answered is not None]
    lateness_ms = sorted((r.answered - r.deadline) * 1e3 for r in answered)
    on_time = [r for r in answered if r.answered <= r.deadline]
    ok = [r for r in answered if r.status == 'OK']
    return {
        'backend': description,
        'machine': {'python': platform.python_version(), 'platform': platform.platform()},
        'workload': {'clients': args.clients, 'requests': len(records),
                     'mean_gap_ms': args.mean_gap_ms, 'budgets_s': list(BUDGETS_S),
                     'max_tokens': list(MAX_TOKENS), 'max_queue': args.max_queue,
                     'min_new_tokens': args.min_new_tokens, 'seed': args.seed},
        'warm_up_rates': {'prefill_tokens_per_s': rates.prefill_tokens_per_s,
                          'decode_tokens_per_s': rates.decode_tokens_per_s,
                          'overhead_ms': rates.overhead_s * 1e3},
        'submitted': len(records),
        'answered': len(answered),
        'lost': len(records) - len(answered),
        'duplicated': sum(1 for r in records if r.answers > 1),
        'answered_by_deadline_share': len(on_time) / len(records) if records else 0.0,
        'late_answers': len(answered) - len(on_time),
        'lateness_ms': _distribution(lateness_ms),
        'max_late_ms': max((x for x in lateness_ms if x > 0), default=0.0),
        'outcomes': dict(Counter(r.status for r in answered).most_common()),
        'ok_share_by_budget_s': _share_by(answered, lambda r: r.budget_s),
        'ok_share_by_priority': _share_by(answered, lambda r: r.priority),
        'ok_total_ms': _distribution(sorted(r.total_s * 1e3 for r in ok)),
        'ok_completion_tokens_mean': statistics.fmean([r.completion_tokens for r in ok])
        if ok else 0.0,
        'scheduler_stats': {'avg_ttft_ms': stats.avg_ttft_s * 1e3,
                            'avg_tokens_per_s': stats.avg_tokens_per_s,
                            'budget_misses': stats.budget_misses,
                            'counts': stats.counts},
    }


def _distribution(values: list[float]) -> dict:
    if not values:
        return {}
    return {'min': values[0], 'p50': _quantile(values, 0.5), 'p90': _quantile(values, 0.9),
            'p99': _quantile(values, 0.99), 'max': values[-1]}


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def _share_by(records: list[Record], key) -> dict:
    groups: dict = {}
    for record in records:
        groups.setdefault(key(record), []).append(record.status == 'OK')
    return {str(k): sum(v) / len(v) for k, v in sorted(groups.items())}


def _plot(records: list[Record], report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    answered = [r for r in records if r.answered is not None]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    lateness = [(r.answered - r.deadline) * 1e3 for r in answered]
    axes[0].hist(lateness, bins=50, color='tab:blue')
    axes[0].axvline(0.0, color='tab:red', linestyle='--', label='deadline')
    axes[0].set_xlabel('answer time - deadline (ms); < 0 is on time')
    axes[0].set_ylabel('requests')
    axes[0].set_title(f"answered by deadline: {report['answered_by_deadline_share']:.1%},"
                      f" lost: {report['lost']}")
    axes[0].legend()
    statuses = list(report['outcomes'])
    axes[1].bar(statuses, [report['outcomes'][s] for s in statuses], color='tab:green')
    axes[1].set_title('outcomes per status')
    axes[1].tick_params(axis='x', rotation=30)
    for status in statuses:
        subset = [r for r in answered if r.status == status]
        axes[2].scatter([r.budget_s * 1e3 for r in subset], [r.total_s * 1e3 for r in subset],
                        s=12, alpha=0.6, label=status)
    top = max(BUDGETS_S) * 1e3
    axes[2].plot([0, top], [0, top], color='tab:red', linestyle='--', label='budget')
    axes[2].set_xlabel('budget (ms)')
    axes[2].set_ylabel('arrival to answer (ms)')
    axes[2].set_title('answer time vs budget')
    axes[2].legend(fontsize=7)
    fig.suptitle(f"scheduler benchmark: {report['backend']['model']}, "
                 f"{report['workload']['clients']} clients, {report['submitted']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_summary(report: dict, out: Path) -> None:
    print(f"submitted {report['submitted']}, answered {report['answered']}, lost"
          f" {report['lost']}, duplicated {report['duplicated']}")
    print(f"answered by deadline: {report['answered_by_deadline_share']:.1%}"
          f" (late: {report['late_answers']}, worst {report['max_late_ms']:.1f} ms)")
    print(f"lateness ms: {report['lateness_ms']}")
    print(f"outcomes: {report['outcomes']}")
    print(f'wrote {out} and {out.with_suffix(".png")}')


if __name__ == '__main__':
    sys.exit(main())
