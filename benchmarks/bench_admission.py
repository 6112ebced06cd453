#!/usr/bin/env python3
"""Benchmark admission control: when the engine says "yes", does the answer come in time?

Several planners (client threads) call the engine at once, closed loop: each submits a
command with a random budget (log-uniform between ``--budget-min-ms`` and
``--budget-max-ms``), waits for its answer, thinks for a while (exponential, mean
``--think-ms``) and submits the next one, until ``--calls`` calls were made. The engine is
driven directly (``Engine.submit``, as the node does from its intake thread; no ROS needed),
with SmolLM2 through llama.cpp by default, ``tool_choice`` required, one thread.

A call is *admitted* when ``submit`` did not answer it at once (the outcome callback had not
run when ``submit`` returned). The goal for admitted calls: at least 90 % end ``OK`` and at
most 5 % end ``BUDGET_EXCEEDED``. Calls refused at the door must be refused fast.

Writes ``benchmarks/results/bench_admission.json`` with the counts, the shares and medians
(answer time of OK calls, time to a refusal at the door, estimate against the real answer
time), and one record per call.

    python benchmarks/bench_admission.py                # 60 calls, 4 callers (~1-2 min)
    python benchmarks/bench_admission.py --quick        # 24 calls (< 1 min)
    python benchmarks/bench_admission.py --system-prompt-chars 1500 --observations 15
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nemotron_ros.engine.config import EngineConfig  # noqa: E402
from nemotron_ros.engine.runtime import Engine, Prompt  # noqa: E402
from nemotron_ros.engine.scheduler import Outcome, RequestKind, RequestStatus  # noqa: E402
from nemotron_ros.engine.world_state import Observation  # noqa: E402

COMMANDS = (
    'Bring the red cup to the kitchen table.',
    'Stop and wait here.',
    'Go to the charging dock.',
    'Is there a person near the door?',
    'Pick up the blue box and put it on the shelf.',
    'What is the battery level?',
    'Look at the person by the door.',
    'Move to the kitchen and wait there.',
)
SYSTEM_FILLER = ('You control a mobile manipulator in a home. Prefer safe, short motions, keep '
                 'a distance of one meter from people, and report what you cannot do. ')


@dataclass
class Call:
    """One call and its answer."""

    caller: int
    command: str
    budget_ms: int
    submitted: float
    at_door: bool = False
    status: str = ''
    message: str = ''
    total_ms: float = 0.0
    estimate_ms: Optional[float] = None
    prompt_tokens: int = 0
    evaluated_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    answers: int = 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    engine = Engine(clock=time.monotonic)
    started = time.monotonic()
    info = engine.load(_config(args))
    load_s = time.monotonic() - started
    engine.set_active(True)
    now = time.monotonic()
    for index in range(args.observations):
        engine.observe(Observation(
            source=f'camera{index % 3}', label=f'object {index}', stamp=now, confidence=0.9,
            attributes={'color': ('red', 'blue', 'green')[index % 3], 'shelf': index},
            ttl_s=1e6))
    rates = engine.stats().rates
    print(f'{info.path}: loaded and warmed up in {load_s:.1f} s; prefill '
          f'{rates.prefill_tokens_per_s:.0f} tok/s + {rates.prefill_fixed_s * 1e3:.0f} ms, '
          f'decode {rates.decode_tokens_per_s:.1f} tok/s')
    calls = _run(engine, args)
    stats = engine.stats()
    engine.close()
    report = _report(calls, args, info, stats, time.monotonic() - started - load_s)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')
    _print_summary(report, out)
    summary = report['summary']
    return 0 if summary['lost'] == 0 and summary['duplicated'] == 0 else 1


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='smollm2', help="'smollm2' or a GGUF file's path")
    parser.add_argument('--calls', type=int, default=60, help='total, over all callers')
    parser.add_argument('--callers', type=int, default=4)
    parser.add_argument('--budget-min-ms', type=int, default=1)
    parser.add_argument('--budget-max-ms', type=int, default=15000)
    parser.add_argument('--n-threads', type=int, default=1)
    parser.add_argument('--max-tool-calls', type=int, default=1)
    parser.add_argument('--tool-choice', default='required', choices=('auto', 'required'))
    parser.add_argument('--system-prompt-chars', type=int, default=0,
                        help='0: the default system prompt; else one of about this length')
    parser.add_argument('--observations', type=int, default=0,
                        help='observations in the world state (prompt size)')
    parser.add_argument('--think-ms', type=float, default=1000.0,
                        help="mean pause between a caller's answer and its next call")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--quick', action='store_true', help='24 calls instead of --calls')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' /
                                             'bench_admission.json'))
    args = parser.parse_args(argv)
    if args.quick:
        args.calls = min(args.calls, 24)
    return args


def _config(args: argparse.Namespace) -> EngineConfig:
    model_path = ''
    if args.model != 'smollm2':
        model_path = args.model
    values = dict(model_path=model_path, n_threads=args.n_threads, tool_choice=args.tool_choice,
                  max_tool_calls=args.max_tool_calls, response_margin_ms=0)
    if args.system_prompt_chars > 0:
        repeats = math.ceil(args.system_prompt_chars / len(SYSTEM_FILLER))
        values['system_prompt'] = (SYSTEM_FILLER * repeats)[:args.system_prompt_chars]
    return EngineConfig(**values)


def _run(engine: Engine, args: argparse.Namespace) -> list[Call]:
    rng = random.Random(args.seed)
    plan = [(rng.choice(COMMANDS),
             round(math.exp(rng.uniform(math.log(args.budget_min_ms),
                                        math.log(args.budget_max_ms)))),
             rng.expovariate(1000.0 / args.think_ms) if args.think_ms > 0 else 0.0)
            for _ in range(args.calls)]
    calls: list[Call] = []
    lock = threading.Lock()
    next_index = iter(range(args.calls))

    def caller(index: int) -> None:
        while True:
            with lock:
                position = next(next_index, None)
            if position is None:
                return
            command, budget_ms, think_s = plan[position]
            call = Call(caller=index, command=command, budget_ms=budget_ms,
                        submitted=time.monotonic())
            done = threading.Event()

            def on_outcome(outcome: Outcome, call: Call = call, done=done,
                           me: int = threading.get_ident()) -> None:
                # Answered at the door = answered inside submit, on the caller's thread.
                call.at_door = threading.get_ident() == me
                _record(call, outcome)
                done.set()

            engine.submit(Prompt(text=command, budget_ms=budget_ms, kind=RequestKind.SERVICE,
                                 arrival=call.submitted), on_outcome)
            done.wait(budget_ms / 1000.0 + 30.0)
            with lock:
                calls.append(call)
            time.sleep(think_s)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(args.callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return calls


def _record(call: Call, outcome: Outcome) -> None:
    call.answers += 1
    call.status = outcome.status.name
    call.message = outcome.status_message
    call.total_ms = outcome.total_s * 1000.0
    if outcome.estimate is not None:
        call.estimate_ms = outcome.estimate.total_s * 1000.0
    if outcome.result is not None:
        usage = outcome.result.usage
        call.prompt_tokens = usage.prompt_tokens
        call.evaluated_tokens = usage.prompt_tokens - usage.prompt_tokens_reused
        call.completion_tokens = usage.completion_tokens
        call.ttft_ms = usage.time_to_first_token_s * 1000.0


def _report(calls: list[Call], args: argparse.Namespace, info, stats, run_s: float) -> dict:
    admitted = [c for c in calls if c.answers and not c.at_door]
    at_door = [c for c in calls if c.answers and c.at_door]
    counts = Counter(c.status for c in admitted)
    ok = [c for c in admitted if c.status == RequestStatus.OK.name]
    exceeded = [c for c in admitted if c.status == RequestStatus.BUDGET_EXCEEDED.name]
    ran = [c for c in admitted if c.estimate_ms and c.completion_tokens]
    summary = {
        'calls': len(calls),
        'admitted': len(admitted),
        'admitted_ok': len(ok),
        'admitted_ok_pct': _pct(len(ok), len(admitted)),
        'admitted_budget_exceeded': len(exceeded),
        'admitted_budget_exceeded_pct': _pct(len(exceeded), len(admitted)),
        'admitted_by_status': dict(counts),
        'rejected_at_door': len(at_door),
        'rejected_at_door_by_status': dict(Counter(c.status for c in at_door)),
        'lost': sum(1 for c in calls if c.answers == 0),
        'duplicated': sum(1 for c in calls if c.answers > 1),
        'goal_met': bool(admitted) and len(ok) >= 0.9 * len(admitted)
        and len(exceeded) <= 0.05 * len(admitted),
        'median_ok_total_ms': _median([c.total_ms for c in ok]),
        'median_ok_budget_ms': _median([c.budget_ms for c in ok]),
        'median_door_rejection_ms': _median([c.total_ms for c in at_door]),
        'max_door_rejection_ms': max((c.total_ms for c in at_door), default=None),
        'median_estimate_over_actual': _median([c.estimate_ms / c.total_ms for c in ran
                                                if c.total_ms > 0]),
        'median_completion_tokens': _median([c.completion_tokens for c in ok]),
        'median_evaluated_prompt_tokens': _median([c.evaluated_tokens for c in ok]),
        'dropped_tool_calls': stats.dropped_tool_calls,
        'run_s': run_s,
    }
    return {
        'benchmark': 'admission',
        'settings': {k: v for k, v in vars(args).items() if k != 'out'},
        'model': {'path': info.path, 'architecture': info.architecture,
                  'chat_format': info.chat_format},
        'machine': {'python': platform.python_version(), 'platform': platform.platform()},
        'rates': {'prefill_tokens_per_s': stats.rates.prefill_tokens_per_s,
                  'prefill_fixed_ms': stats.rates.prefill_fixed_s * 1e3,
                  'decode_tokens_per_s': stats.rates.decode_tokens_per_s,
                  'overhead_ms': stats.rates.overhead_s * 1e3,
                  'completion_tokens_mean': stats.rates.completion_tokens},
        'summary': summary,
        'calls': [asdict(c) for c in sorted(calls, key=lambda c: c.submitted)],
    }


def _pct(part: int, whole: int) -> Optional[float]:
    return round(100.0 * part / whole, 1) if whole else None


def _median(values: list[float]) -> Optional[float]:
    return round(statistics.median(values), 1) if values else None


def _print_summary(report: dict, out: Path) -> None:
    s = report['summary']
    print(f"{s['calls']} calls: {s['admitted']} admitted -> {s['admitted_ok']} OK "
          f"({s['admitted_ok_pct']} %), {s['admitted_budget_exceeded']} BUDGET_EXCEEDED "
          f"({s['admitted_budget_exceeded_pct']} %), by status {s['admitted_by_status']}; "
          f"{s['rejected_at_door']} refused at the door {s['rejected_at_door_by_status']} "
          f"(median {s['median_door_rejection_ms']} ms)")
    print(f"median OK answer {s['median_ok_total_ms']} ms (budget {s['median_ok_budget_ms']} "
          f"ms), estimate/actual {s['median_estimate_over_actual']}, lost {s['lost']}, "
          f"duplicated {s['duplicated']}; goal met: {s['goal_met']}")
    print(f'report: {out}')


if __name__ == '__main__':
    sys.exit(main())
