#!/usr/bin/env python3
"""Benchmark the remote backend against the local llama.cpp backend on the same GGUF.

The server is llama-cpp-python's own OpenAI-compatible server (``llama_cpp.server``) on
loopback, one thread, like the local arm; both read the same GGUF. Three measurements:

* **Overhead**: time to first token and total time of the same requests (greedy, a
  grammar-constrained tool call and a short unconstrained reply) through the remote backend
  divided by the local llama.cpp backend; the arms are interleaved, alternating which goes
  first, and the ratio of medians is reported (goal: <= 1.10 on SmolLM2). Both keep the fixed
  prefix: the local backend in its second sequence, the server in its prompt cache. A third
  arm streams the same HTTP request with nothing on top (``bare``): remote ÷ bare is what the
  backend adds, bare ÷ local what the server (llama_cpp.server's Python loop) and the wire
  cost.
* **Deadline hit rate**: ``--plans`` requests with budgets drawn from ``--budgets`` through an
  :class:`Engine` on the remote backend (admission control learns the server's rates at
  warm-up): the share answered by their deadline (OK, or refused at once as REJECTED_BUDGET),
  and how late the late ones were.
* **Shared server**: ``--clients`` engine clients (engines in threads of this process: four
  ROS node processes do not fit two cores next to the server) each sending ``--shared``
  requests back to back to one server; completed requests per second vs one client.

Writes ``--out`` (JSON) and a PNG next to it.

    python benchmarks/bench_remote.py                      # SmolLM2, short run
    python benchmarks/bench_remote.py --reps 20 --plans 100 --clients 4
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / 'benchmarks'):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_engine import write_report  # noqa: E402  (this folder: shared report writer)

from nemotron_ros.engine.backends.llama.backend import LlamaBackend, LlamaConfig  # noqa: E402
from nemotron_ros.engine.backends.remote.backend import (  # noqa: E402
    RemoteBackend,
    RemoteConfig,
)
from nemotron_ros.engine.backends.remote.flavors import completion_body  # noqa: E402
from nemotron_ros.engine.config import EngineConfig  # noqa: E402
from nemotron_ros.engine.runtime import Engine, Prompt  # noqa: E402
from nemotron_ros.engine.scheduler import RequestStatus  # noqa: E402
from nemotron_ros.engine.tools import ToolRegistry  # noqa: E402
from nemotron_ros.engine.types import (  # noqa: E402
    GenerationRequest,
    Message,
    SamplingParams,
    ToolChoice,
)
from nemotron_ros.testing.llama_server import LlamaCppServer  # noqa: E402
from nemotron_ros.testing.models import model_by_name  # noqa: E402

TOOLS_FILE = ROOT / 'config' / 'tools.example.yaml'
TOOLS = ToolRegistry.from_yaml(TOOLS_FILE)
SYSTEM = 'You are the language interface of a mobile robot. Answer briefly.'
GOALS = ('Go to the kitchen', 'Say hello to the visitor', 'Stop right there',
         'Look at the red cup', 'Check the battery', 'Drive to the charging dock',
         'Tell me what you see', 'Bring the cup to the table')


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model_by_name(args.model, tempfile.mkdtemp(prefix='bench_remote_'))
    log = str(out.with_suffix('.server.log'))
    with LlamaCppServer(model, alias=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
                        log=log) as server:
        overhead = _overhead(server, model, args)
        deadlines = _deadlines(server, model, args) if args.plans else {}
        shared = _shared(server, model, args) if args.shared else []
    report = {'machine': {'platform': platform.platform(), 'python': platform.python_version(),
                          'threads': args.threads},
              'args': vars(args), 'model': str(model), 'overhead': overhead,
              'deadlines': deadlines, 'shared': shared}
    write_report(report, out, _plot, _print_summary)
    return 0


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='smollm2',
                        help='smollm2, tiny_nemotron_h or a GGUF path')
    parser.add_argument('--reps', type=int, default=12, help='interleaved pairs per request')
    parser.add_argument('--plans', type=int, default=100, help='mixed-budget plans')
    parser.add_argument('--budgets', default='500,1000,2000,4000,8000,16000',
                        help='budgets of the plans, ms (drawn uniformly)')
    parser.add_argument('--clients', type=int, default=4)
    parser.add_argument('--shared', type=int, default=6, help='requests per shared client')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--n-ctx', type=int, default=4096)
    parser.add_argument('--max-tokens', type=int, default=32)
    parser.add_argument('--seed', type=int, default=7)
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' /
                                             'bench_remote.json'))
    return parser.parse_args(argv)


def _request(kind: str, goal: str, max_tokens: int) -> GenerationRequest:
    """A greedy request of ``kind``: 'tool call' (constrained) or 'reply' (unconstrained)."""
    messages = [Message('system', SYSTEM), Message('user', goal)]
    if kind == 'tool call':
        return GenerationRequest(messages=messages, tools=TOOLS.names,
                                 tool_choice=ToolChoice.REQUIRED, max_tool_calls=1,
                                 sampling=SamplingParams(max_tokens=max_tokens))
    return GenerationRequest(messages=messages, tools=TOOLS.names, constrained=False,
                             sampling=SamplingParams(max_tokens=max_tokens))


def _overhead(server: LlamaCppServer, model: str, args: argparse.Namespace) -> list[dict]:
    local = LlamaBackend(LlamaConfig(model_path=str(model), n_ctx=args.n_ctx,
                                     n_threads=args.threads), TOOLS)
    remote = RemoteBackend(RemoteConfig(url=server.url, tokenizer_path=str(model),
                                        n_ctx=args.n_ctx, stall_timeout_s=120.0), TOOLS)
    bare = _BareStream(server, str(model), args.n_ctx)
    local.load()
    remote.load()
    rows = []
    try:
        for name in ('tool call', 'reply'):
            times: dict[str, dict[str, list[float]]] = {
                arm: {'ttft': [], 'total': []} for arm in ('local', 'remote', 'bare')}
            for backend in (local, remote, bare):  # the first call of each builds its caches
                backend.generate(_request(name, 'Wait here.', args.max_tokens))
            for rep in range(args.reps):
                # A new request text every time, the same for both arms: each evaluates the
                # request after the fixed prefix that it keeps (never a whole cached prompt).
                request = _request(name, f'{GOALS[rep % len(GOALS)]} (task {rep}).',
                                   args.max_tokens)
                arms = [('local', local), ('remote', remote), ('bare', bare)]
                for arm, backend in arms if rep % 2 == 0 else arms[::-1]:
                    if arm != 'local':
                        # Leave the server holding the prefix, not this whole prompt from the
                        # previous arm: each arm then evaluates the request after the prefix,
                        # as the local backend does (untimed).
                        bare.generate(_request(name, 'Wait here.', 1))
                    usage = backend.generate(request).usage
                    times[arm]['ttft'].append(usage.time_to_first_token_s)
                    times[arm]['total'].append(usage.total_s)
            row = {'request': name}
            for arm in times:
                for key, values in times[arm].items():
                    row[f'{arm}_{key}_median_ms'] = statistics.median(values) * 1000
            for key in ('ttft', 'total'):
                row[f'{key}_ratio'] = row[f'remote_{key}_median_ms'] / \
                    row[f'local_{key}_median_ms']
                row[f'{key}_ratio_to_bare'] = row[f'remote_{key}_median_ms'] / \
                    row[f'bare_{key}_median_ms']
            rows.append(row)
    finally:
        local.unload()
        remote.unload()
        bare.close()
    return rows


class _BareStream:
    """The request the remote backend sends, streamed with nothing on top: the server's cost.

    The body is built as the backend builds it (rendered prompt, grammar) and its events are
    only iterated, so remote ÷ bare is what the backend itself adds (deadline watcher, text
    assembly, parsing and validation) and bare ÷ local is the server's and the wire's share.
    """

    def __init__(self, server: LlamaCppServer, model: str, n_ctx: int) -> None:
        self.alias = server.alias
        self.shaper = RemoteBackend(RemoteConfig(url=server.url, tokenizer_path=model,
                                                 n_ctx=n_ctx), TOOLS)
        self.shaper.load()
        self.client = httpx.Client(base_url=f'{server.url}/v1', timeout=120.0)

    def generate(self, request: GenerationRequest) -> SimpleNamespace:
        started = time.monotonic()
        prepared = self.shaper.prepare(request, lambda text: [0] * self.shaper.count_tokens(
            text), self.shaper.info.n_ctx)
        body = completion_body('llama_cpp', self.alias, prepared.rendered.text, (),
                               request.sampling, prepared.max_tokens, prepared.grammar)
        first = 0.0
        with self.client.stream('POST', '/completions', json=body) as response:
            for line in response.iter_lines():
                if line.startswith('data:') and not first:
                    first = time.monotonic()
        now = time.monotonic()
        return SimpleNamespace(usage=SimpleNamespace(time_to_first_token_s=first - started,
                                                     total_s=now - started))

    def close(self) -> None:
        self.client.close()
        self.shaper.unload()


def _engine(server: LlamaCppServer, model: str, args: argparse.Namespace) -> Engine:
    engine = Engine()
    engine.load(EngineConfig(
        backend='remote', model_path=str(model), tools_file=str(TOOLS_FILE),
        remote_url=server.url, remote_model=server.alias, remote_stall_timeout_ms=120_000,
        n_ctx=args.n_ctx, temperature=0.0, max_tokens=args.max_tokens, queue_size=64))
    engine.set_active(True)
    return engine


def _ask(engine: Engine, prompt: Prompt) -> object:
    done = threading.Event()
    box: list = []

    def answer(outcome: object) -> None:
        box.append(outcome)
        done.set()

    engine.submit(prompt, answer)
    done.wait()
    return box[0]


def _deadlines(server: LlamaCppServer, model: str, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    budgets = [int(b) for b in args.budgets.split(',')]
    engine = _engine(server, model, args)
    rows = []
    try:
        for _ in range(args.plans):
            budget = rng.choice(budgets)
            outcome = _ask(engine, Prompt(text=rng.choice(GOALS), budget_ms=budget))
            rows.append({'budget_ms': budget, 'status': outcome.status.name,
                         'total_ms': outcome.total_s * 1000})
    finally:
        engine.close()
    kept = [r for r in rows if r['total_ms'] <= r['budget_ms']]
    late = [r['total_ms'] - r['budget_ms'] for r in rows if r['total_ms'] > r['budget_ms']]
    by_budget = {}
    for budget in budgets:
        mine = [r for r in rows if r['budget_ms'] == budget]
        by_budget[budget] = {
            'plans': len(mine), 'statuses': dict(Counter(r['status'] for r in mine)),
            'hit_rate': sum(r['total_ms'] <= budget for r in mine) / len(mine) if mine else 0}
    return {'plans': len(rows), 'hit_rate': len(kept) / len(rows),
            'statuses': dict(Counter(r['status'] for r in rows)),
            'late_ms_max': max(late, default=0.0), 'by_budget': by_budget, 'rows': rows}


def _shared(server: LlamaCppServer, model: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    for clients in sorted({1, args.clients}):
        engines = [_engine(server, model, args) for _ in range(clients)]
        try:
            wall, statuses = _run_clients(engines, args.shared)
        finally:
            for engine in engines:
                engine.close()
        rows.append({'clients': clients, 'requests': clients * args.shared, 'wall_s': wall,
                     'requests_per_s': clients * args.shared / wall,
                     'statuses': dict(statuses),
                     'all_ok': statuses[RequestStatus.OK.name] == clients * args.shared})
    return rows


def _run_clients(engines: list[Engine], count: int) -> tuple[float, Counter]:
    """Each engine sends ``count`` requests back to back, all at once; (wall s, statuses)."""
    statuses: Counter = Counter()
    lock = threading.Lock()

    def client(engine: Engine, index: int) -> None:
        for i in range(count):
            outcome = _ask(engine, Prompt(text=GOALS[(index + i) % len(GOALS)],
                                          budget_ms=600_000))
            with lock:
                statuses[outcome.status.name] += 1

    threads = [threading.Thread(target=client, args=(e, i)) for i, e in enumerate(engines)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - start, statuses


def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    rows = report['overhead']
    labels = [f"{r['request']}\n{key}" for r in rows for key in ('ttft', 'total')]
    ratios = [r[f'{key}_ratio'] for r in rows for key in ('ttft', 'total')]
    to_bare = [r[f'{key}_ratio_to_bare'] for r in rows for key in ('ttft', 'total')]
    spots = range(len(labels))
    axes[0].bar([s - 0.2 for s in spots], ratios, width=0.4, color='tab:blue',
                label='remote / local llama.cpp')
    axes[0].bar([s + 0.2 for s in spots], to_bare, width=0.4, color='tab:orange',
                label='remote / bare HTTP stream')
    axes[0].set_xticks(list(spots), labels)
    axes[0].axhline(1.10, color='tab:red', linestyle='--', label='goal 1.10')
    axes[0].set_ylabel('remote / local, ratio of medians')
    axes[0].set_title(f"overhead, {report['args']['reps']} interleaved pairs")
    axes[0].legend()
    budgets = report['deadlines'].get('by_budget', {})
    keys = sorted(budgets, key=int)
    axes[1].bar([str(k) for k in keys], [budgets[k]['hit_rate'] for k in keys],
                color='tab:green')
    axes[1].set_ylim(0, 1.05)
    axes[1].set_xlabel('budget (ms)')
    axes[1].set_ylabel('answered by the deadline')
    if budgets:
        axes[1].set_title(f"deadline hit rate, {report['deadlines']['plans']} plans: "
                          f"{report['deadlines']['hit_rate']:.0%}")
    shared = report['shared']
    axes[2].bar([str(r['clients']) for r in shared], [r['requests_per_s'] for r in shared],
                color='tab:purple')
    axes[2].set_xlabel('engine clients sharing one server')
    axes[2].set_ylabel('completed requests / s')
    axes[2].set_title('throughput of one shared server')
    fig.suptitle(f"remote backend (llama_cpp.server on loopback) vs local llama.cpp, "
                 f"{Path(report['model']).name}, {report['machine']['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_summary(report: dict, out: Path) -> None:
    print('\nrequest     medians ms: ttft local/remote/bare  total local/remote/bare'
          '   remote/local ttft, total   remote/bare ttft, total')
    for r in report['overhead']:
        print(f"{r['request']:<10} {r['local_ttft_median_ms']:8.1f}"
              f" {r['remote_ttft_median_ms']:7.1f} {r['bare_ttft_median_ms']:7.1f}"
              f"  {r['local_total_median_ms']:8.1f}"
              f" {r['remote_total_median_ms']:7.1f} {r['bare_total_median_ms']:7.1f}"
              f"   {r['ttft_ratio']:5.3f} {r['total_ratio']:5.3f}"
              f"   {r['ttft_ratio_to_bare']:5.3f} {r['total_ratio_to_bare']:5.3f}")
    d = report['deadlines'] or {'hit_rate': 0.0, 'plans': 0, 'statuses': {}, 'late_ms_max': 0.0}
    print(f"\ndeadline hit rate: {d['hit_rate']:.1%} of {d['plans']} plans {d['statuses']}; "
          f"latest answer {d['late_ms_max']:.1f} ms after its deadline")
    for r in report['shared']:
        print(f"{r['clients']} client(s): {r['requests_per_s']:.2f} requests/s "
              f"({r['requests']} in {r['wall_s']:.1f} s) {r['statuses']}")
    print(f'wrote {out} and {out.with_suffix(".png")}')


if __name__ == '__main__':
    sys.exit(main())
