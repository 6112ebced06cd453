#!/usr/bin/env python3
"""Benchmark what the grammar, the abort hook and configure cost in the llama.cpp engine.

Every answer the node gives is grammar-constrained, so the grammar must cost next to nothing.
Each measurement runs its arms side by side (interleaved, alternating which goes first) so
that load from other processes hits all arms alike, and reports medians:

* **constrained / unconstrained decode tok/s** through ``LlamaBackend.generate`` (greedy,
  same prompt, threads and token count): a constrained run (tool choice ``auto`` over the
  example tools, or ``required`` for a tool-call prompt) sets the token count, and the
  unconstrained arm generates exactly as many with end-of-generation banned. Grammar ms per
  token is ``1000/constrained - 1000/unconstrained``. Models: SmolLM2-135M (49k vocabulary),
  ``vocab131k`` (the tiny ``nemotron_h`` with Nemotron 3's 131,072-token vocabulary) and
  ``real_mixer`` (``REAL_MIXER_PRESET``);
* **engine / llama-bench**: prefill of ``--prompt`` tokens (``-p N``) and decode of 128 tokens
  at that depth (``-n 128 -d N``), when a ``llama-bench`` is found or built (``--llama-bench``,
  or ``--llama-src`` with a llama-cpp-python sdist or its ``vendor/llama.cpp``; built in this
  benchmark's temp dir, never in the repository);
* **prefill with and without a busy Python thread** (a pure-Python loop holding the GIL
  whenever it can), the cost the abort hook used to add;
* **configure time** of the engine with SmolLM2 (``Engine.load`` with warm-up), cold and warm
  (prefix state cache hit).

Writes ``--out`` (JSON) and a PNG next to it.

    python benchmarks/bench_constrained.py                       # all sections, ~3 min
    python benchmarks/bench_constrained.py --sections decode --models smollm2 --reps 9
    python benchmarks/bench_constrained.py --llama-src ~/llama_cpp_python-0.3.36.tar.gz
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / 'benchmarks'):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_engine  # noqa: E402  (this folder: the shared engine helpers)
from bench_engine import _interleaved  # noqa: E402

from nemotron_ros.engine.backends.llama.backend import LlamaBackend  # noqa: E402
from nemotron_ros.engine.tools import ToolRegistry  # noqa: E402
from nemotron_ros.engine.types import (  # noqa: E402
    GenerationRequest,
    Message,
    SamplingParams,
    ToolChoice,
)

TOOLS = ToolRegistry.from_yaml(ROOT / 'config' / 'tools.example.yaml')
SYSTEM = 'You are the language interface of a mobile robot in a small apartment.'
SCENARIOS = {
    'reply': (ToolChoice.AUTO, 'Tell me a long story about a robot that explores an old house.'),
    'call': (ToolChoice.REQUIRED, 'Go to the kitchen, then say that you arrived, then go to '
                                  'the living room and say that you are back.'),
}
FILLER = 'The corridor between the kitchen and the living room is clear. '
SCRATCH = Path(tempfile.gettempdir()) / 'nemotron_ros_bench'


@dataclass
class Paired:
    """Two arms measured side by side; ``ratio`` is a / b of the medians."""

    name: str
    a_label: str
    b_label: str
    unit: str
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    note: str = ''

    def summary(self) -> dict:
        a, b = statistics.median(self.a), statistics.median(self.b)
        return {**asdict(self), 'a_median': a, 'b_median': b, 'ratio': a / b if b else 0.0}


@dataclass
class DecodeRow(Paired):
    """Constrained (a) and unconstrained (b) decode tok/s of one model and scenario."""

    model: str = ''
    scenario: str = ''
    n_vocab: int = 0
    tokens: int = 0

    def summary(self) -> dict:
        out = super().summary()
        con, free = out['a_median'], out['b_median']
        out['grammar_ms_per_token'] = 1e3 / con - 1e3 / free if con and free else 0.0
        return out


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    report: dict = {
        'machine': {'python': platform.python_version(), 'platform': platform.platform(),
                    'threads': args.threads},
        'args': {k: v for k, v in vars(args).items() if k != 'out'},
    }
    models = {name: str(_model_path(name)) for name in args.models}
    report['models'] = models
    if 'decode' in args.sections:
        report['decode'] = [row.summary() for name, path in models.items()
                            for row in _measure_decode(name, path, args)]
    smollm2 = str(_model_path('smollm2'))
    if 'bench' in args.sections:
        report['bench'] = _measure_llama_bench(smollm2, args)
    if 'busy' in args.sections:
        report['busy'] = [p.summary() for p in _measure_busy(smollm2, args)]
    if 'configure' in args.sections:
        report['configure'] = [p.summary() for p in _measure_configure(args)]
    bench_engine.write_report(report, Path(args.out), _plot, _print_summary)
    return 0


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sections', type=_names, default=['decode', 'bench', 'busy',
                                                            'configure'],
                        help='comma-separated: decode, bench, busy, configure')
    parser.add_argument('--models', type=_names, default=['smollm2', 'vocab131k', 'real_mixer'],
                        help='comma-separated: smollm2, vocab131k, real_mixer, tiny or paths')
    parser.add_argument('--scenarios', type=_names, default=list(SCENARIOS),
                        help=f'comma-separated decode scenarios: {", ".join(SCENARIOS)}')
    parser.add_argument('--reps', type=int, default=3, help='interleaved repetitions')
    parser.add_argument('--threads', type=int, default=1, help='llama.cpp threads')
    parser.add_argument('--tokens', type=int, default=48, help='most tokens per decode run')
    parser.add_argument('--prompt', type=int, default=256,
                        help='prompt tokens for the llama-bench and busy-thread prefills')
    parser.add_argument('--bench-reps', type=int, default=2,
                        help='interleaved repetitions of the llama-bench comparison')
    parser.add_argument('--configure-reps', type=int, default=2,
                        help='warm configures (and cold ones, capped at 2)')
    parser.add_argument('--llama-bench', default='',
                        help='a llama-bench binary built from the llama.cpp that '
                             'llama-cpp-python vendors (default: look in the temp dir)')
    parser.add_argument('--llama-src', default='',
                        help='llama-cpp-python sdist (.tar.gz) or vendor/llama.cpp directory '
                             'to build llama-bench from, in the temp dir (~15 min on 2 cores)')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' /
                                             'bench_constrained.json'))
    args = parser.parse_args(argv)
    if min(args.reps, args.threads) < 1 or args.tokens < 8:
        parser.error('--reps and --threads must be >= 1, --tokens >= 8')
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f'unknown scenarios {sorted(unknown)}; choose from {list(SCENARIOS)}')
    return args


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(',') if part.strip()]


def _model_path(name: str) -> Path:
    from nemotron_ros.testing import NEMOTRON3_VOCAB_SIZE, REAL_MIXER_PRESET
    from nemotron_ros.testing.models import smollm2_gguf_path, tiny_nemotron_h_path

    presets = {'tiny': {}, 'real_mixer': dict(REAL_MIXER_PRESET),
               'vocab131k': {'vocab_size': NEMOTRON3_VOCAB_SIZE}}
    if name in presets:
        return tiny_nemotron_h_path(SCRATCH, **presets[name])
    if name == 'smollm2':
        return smollm2_gguf_path()
    return Path(name)


def _backend(path: str, threads: int, n_ctx: int = 4096,
             prefix_cache: bool = True) -> AbstractContextManager[LlamaBackend]:
    """A loaded engine backend (bench_engine's, with the engine's default flash attention)."""
    options = argparse.Namespace(threads=threads, flash_attn='auto')
    return bench_engine._backend(options, path, n_ctx, prefix_cache)


# -- constrained vs unconstrained decode ----------------------------------------------------
def _measure_decode(name: str, path: str, args: argparse.Namespace) -> list[DecodeRow]:
    rows = []
    with _backend(path, args.threads) as backend:
        for scenario in args.scenarios:
            row = DecodeRow(f'{name} {scenario}', 'constrained', 'unconstrained', 'tok/s',
                            model=name, scenario=scenario, n_vocab=backend.info.n_vocab)
            if not _decode_runs(backend, row, args):
                print(f'  {name} {scenario}: only {row.tokens} constrained tokens, skipped')
                continue
            summary = row.summary()
            print(f"  {name:<10} {scenario:<5} {row.tokens:3d} tokens: constrained "
                  f"{summary['a_median']:6.1f} tok/s, unconstrained "
                  f"{summary['b_median']:6.1f} tok/s, ratio "
                  f"{summary['ratio']:.3f}, grammar "
                  f"{summary['grammar_ms_per_token']:.2f} ms/token", flush=True)
            rows.append(row)
    return rows


def _decode_runs(backend: LlamaBackend, row: DecodeRow, args: argparse.Namespace) -> bool:
    """Fill ``row``'s rates; False when the constrained answer is too short to time."""
    choice, text = SCENARIOS[row.scenario]
    messages = [Message('system', SYSTEM), Message('user', text)]

    def run(constrained: bool, rates: list[float], count: int) -> int:
        usage = backend.generate(GenerationRequest(
            messages=messages, tools=TOOLS.names, tool_choice=choice, constrained=constrained,
            sampling=SamplingParams(max_tokens=count, ignore_eos=not constrained))).usage
        if not constrained and usage.completion_tokens != count:
            raise RuntimeError(f'unconstrained run stopped early: {usage}')
        rates.append(usage.tokens_per_second)
        return usage.completion_tokens

    row.tokens = run(True, [], args.tokens)  # greedy: every constrained run is alike
    if row.tokens < 8:
        return False
    run(False, [], row.tokens)
    for rep in range(args.reps):
        _interleaved(rep, (lambda: run(True, row.a, args.tokens),
                           lambda: run(False, row.b, row.tokens)))
    return True


# -- engine vs llama-bench --------------------------------------------------------------
BENCH_BUILD = SCRATCH / 'llama_bench_build'
BENCH_CMAKE_FLAGS = ('-DCMAKE_BUILD_TYPE=Release', '-DGGML_NATIVE=OFF', '-DGGML_AVX=ON',
                     '-DGGML_AVX2=ON', '-DGGML_FMA=ON', '-DGGML_F16C=ON', '-DGGML_BMI2=ON',
                     '-DLLAMA_CURL=OFF', '-DLLAMA_BUILD_SERVER=OFF', '-DLLAMA_BUILD_TESTS=OFF',
                     '-DBUILD_SHARED_LIBS=OFF')
"""tools/setup.sh's llama-cpp-python flags, so both run the same kernels."""


def _llama_bench_binary(args: argparse.Namespace) -> tuple[Optional[Path], str]:
    """(llama-bench, '') or (None, why not)."""
    if args.llama_bench:
        path = Path(args.llama_bench)
        return (path, '') if path.is_file() else (None, f'--llama-bench {path} not found')
    found = sorted(BENCH_BUILD.glob('*/vendor/llama.cpp/build/bin/llama-bench'))
    if found:
        return found[-1], ''
    if not args.llama_src:
        return None, ('no llama-bench: pass --llama-src with the llama-cpp-python sdist '
                      '(pip download --no-binary :all: --no-deps llama-cpp-python==VERSION) '
                      'to build one (~15 min on 2 cores), or --llama-bench')
    return _build_llama_bench(Path(args.llama_src))


def _build_llama_bench(source: Path) -> tuple[Optional[Path], str]:
    import subprocess
    import tarfile

    if source.is_file():
        BENCH_BUILD.mkdir(parents=True, exist_ok=True)
        with tarfile.open(source) as archive:
            archive.extractall(BENCH_BUILD, filter='data')
        source = next(BENCH_BUILD.glob('*/vendor/llama.cpp'))
    build = source / 'build'
    print(f'  building llama-bench in {build} (minutes)', flush=True)
    for command in (['cmake', '-S', str(source), '-B', str(build), *BENCH_CMAKE_FLAGS],
                    ['cmake', '--build', str(build), '--target', 'llama-bench', '-j2']):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            return None, f'building llama-bench failed: {done.stderr.strip()[-300:]}'
    return build / 'bin' / 'llama-bench', ''


def _run_llama_bench(binary: Path, model: str, threads: int, prompt: int, gen: int,
                     depth: int) -> float:
    """llama-bench's tokens/s for one test (-p prompt or -n gen at -d depth)."""
    import subprocess

    done = subprocess.run(
        [str(binary), '-m', model, '-t', str(threads), '-p', str(prompt), '-n', str(gen),
         '-d', str(depth), '-b', '512', '-ub', '512', '-fa', 'auto', '-r', '1', '-o', 'json'],
        capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout)[0]['avg_ts'])


def _measure_llama_bench(model: str, args: argparse.Namespace) -> dict:
    binary, why = _llama_bench_binary(args)
    if binary is None:
        print(f'  llama-bench comparison skipped: {why}', flush=True)
        return {'skipped': why}
    prefill = Paired('prefill', 'engine', 'llama-bench', 'tok/s')
    decode = Paired('decode', 'engine', 'llama-bench', 'tok/s')
    n = args.prompt
    with _backend(model, args.threads, n_ctx=max(1024, n + 256), prefix_cache=False) as engine:
        messages = _messages_of(engine, n)

        def run_engine() -> None:
            usage = engine.generate(GenerationRequest(
                messages=messages, constrained=False,
                sampling=SamplingParams(max_tokens=128, ignore_eos=True))).usage
            prefill.a.append(usage.prompt_tokens / usage.prefill_s)
            decode.a.append(usage.tokens_per_second)
            prefill.note = f'engine prompt {usage.prompt_tokens} tokens; llama-bench -p {n}'

        def run_bench() -> None:
            prefill.b.append(_run_llama_bench(binary, model, args.threads, n, 0, 0))
            decode.b.append(_run_llama_bench(binary, model, args.threads, 0, 128, n))

        run_engine()  # warm-up
        for rep in range(args.bench_reps):
            _interleaved(rep, (run_engine, run_bench))
    decode.note = f'128 tokens at depth {n} (llama-bench -n 128 -d {n})'
    rows = [prefill.summary(), decode.summary()]
    for row in rows:
        print(f"  engine / llama-bench {row['name']}: {row['a_median']:.1f} / "
              f"{row['b_median']:.1f} tok/s = {row['ratio']:.3f}", flush=True)
    return {'binary': str(binary), 'rows': rows}


def _messages_of(backend: LlamaBackend, tokens: int) -> list[Message]:
    """A chat whose rendered prompt has about ``tokens`` tokens (never more)."""
    words: list[str] = []
    while True:
        more = words + FILLER.split()
        messages = [Message('system', SYSTEM), Message('user', ' '.join(more))]
        if backend.count_tokens(backend.prompt_format.render(messages).text) > tokens:
            return [Message('system', SYSTEM), Message('user', ' '.join(words))]
        words = more


# -- prefill with a busy Python thread ------------------------------------------------------
def _measure_busy(model: str, args: argparse.Namespace) -> list[Paired]:
    """Prefill seconds with / without a thread spinning in Python, per abort hook.

    The spinner also takes a core, which a shared 2-core host may not have to spare; the
    ``nice 19`` spinner runs only on otherwise idle CPU, so what it adds is the GIL's part.
    """
    from nemotron_ros.engine.backends.llama import native

    rows = []
    for hook in ('native', 'python'):
        callback = native.abort_callback
        if hook == 'python':  # the former hook, for comparison only
            native.abort_callback = lambda: None
        try:
            pair = _busy_runs(model, f'prefill, {hook} hook', args)
        finally:
            native.abort_callback = callback
        for row in pair:
            summary = row.summary()
            print(f"  {row.name}: {row.a_label} {summary['a_median']:.3f} s, quiet "
                  f"{summary['b_median']:.3f} s, x{summary['ratio']:.3f}", flush=True)
        rows += pair
    return rows


def _busy_runs(model: str, name: str, args: argparse.Namespace) -> tuple[Paired, Paired]:
    busy = Paired(name, 'busy thread', 'quiet', 's')
    niced = Paired(f'{name}, nice 19', 'busy thread, nice 19', 'quiet', 's', b=busy.b)
    with _backend(model, args.threads, n_ctx=max(1024, args.prompt + 64),
                  prefix_cache=False) as engine:
        request = GenerationRequest(messages=_messages_of(engine, args.prompt),
                                    constrained=False, sampling=SamplingParams(max_tokens=1))

        def run(spinner: Optional[int], times: list[float]) -> None:
            with _busy_thread(spinner):
                request.deadline = time.monotonic() + 600.0  # armed, never reached
                times.append(engine.generate(request).usage.prefill_s)

        run(None, [])
        for rep in range(args.reps):
            _interleaved(rep, (lambda: run(0, busy.a), lambda: run(19, niced.a),
                               lambda: run(None, busy.b)))
    return busy, niced


@contextmanager
def _busy_thread(niceness: Optional[int]) -> Iterator[None]:
    """A thread spinning in pure Python (at this niceness; None: no thread)."""
    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        started.set()
        count = 0
        while not stop.is_set():
            count += 1

    thread = threading.Thread(target=spin, daemon=True)
    if niceness is not None:
        thread.start()
        started.wait()
    try:
        yield
    finally:
        stop.set()
        if niceness is not None:
            thread.join()


# -- configure time -------------------------------------------------------------------------
def _measure_configure(args: argparse.Namespace) -> list[Paired]:
    """Engine.load with SmolLM2: cold (no state file) vs warm (state restored)."""
    import shutil

    from nemotron_ros.engine.config import EngineConfig
    from nemotron_ros.engine.runtime import Engine

    cache = Path(tempfile.mkdtemp(prefix='state_cache_', dir=SCRATCH))
    row = Paired('configure SmolLM2', 'warm restart', 'no state file', 's')

    def configure(times: list[float], cold: bool) -> None:
        if cold:
            shutil.rmtree(cache, ignore_errors=True)
        engine = Engine()
        start = time.perf_counter()
        engine.load(EngineConfig(n_threads=args.threads, llama_state_cache_dir=str(cache)))
        times.append(time.perf_counter() - start)
        engine.close()

    try:
        cold_reps = min(2, args.configure_reps)
        configure(row.b, cold=True)
        for rep in range(args.configure_reps):
            arms = [lambda: configure(row.a, cold=False)]
            if rep < cold_reps - 1:
                arms.append(lambda: (configure(row.b, cold=True), configure([], cold=False)))
            _interleaved(rep, arms)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    summary = row.summary()
    print(f"  configure: warm {summary['a_median']:.2f} s, cold {summary['b_median']:.2f} s",
          flush=True)
    return [row]


# -- report ---------------------------------------------------------------------------------
def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    panels = [key for key in ('decode', 'bench', 'busy', 'configure') if report.get(key)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 5),
                             squeeze=False)
    for ax, key in zip(axes[0], panels, strict=False):
        _PANELS[key](ax, report)
    fig.suptitle(f"constrained decoding, abort hook and configure: {report['machine']['threads']}"
                 f" thread(s), medians of {report['args']['reps']} interleaved runs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_decode(ax, report: dict) -> None:
    rows = report['decode']
    labels = [f"{r['model']}\n{r['scenario']}" for r in rows]
    bars = ax.bar(labels, [r['ratio'] for r in rows], color='tab:green')
    for bar, row in zip(bars, rows, strict=True):
        ax.annotate(f"{row['grammar_ms_per_token']:.2f} ms/tok",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha='center', va='bottom', fontsize=8)
    ax.axhline(0.95, color='tab:red', linestyle='--', label='goal 0.95')
    ax.set_ylabel('constrained / unconstrained decode tok/s')
    ax.set_title('grammar cost (label: grammar ms per token)')
    ax.legend(fontsize=7)


def _plot_bench(ax, report: dict) -> None:
    bench = report['bench']
    if 'rows' not in bench:
        ax.text(0.5, 0.5, f"llama-bench skipped:\n{bench['skipped'][:80]}", ha='center',
                wrap=True, fontsize=8)
        ax.set_axis_off()
        return
    _paired_bars(ax, bench['rows'], 'engine / llama-bench', 'engine vs llama-bench (SmolLM2)')


def _plot_busy(ax, report: dict) -> None:
    _paired_bars(ax, report['busy'], 'prefill time, busy thread / quiet',
                 'a busy Python thread during prefill')


def _plot_configure(ax, report: dict) -> None:
    rows = report['configure']
    labels = [label for r in rows for label in (r['a_label'], r['b_label'])]
    values = [v for r in rows for v in (r['a_median'], r['b_median'])]
    bars = ax.bar(labels, values, color=['tab:green', 'tab:gray'])
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f'{value:.1f} s', (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha='center', va='bottom', fontsize=8)
    ax.axhline(5.0, color='tab:red', linestyle='--', label='goal 5 s (warm)')
    ax.set_ylabel('configure (Engine.load), s')
    ax.set_title('configure time, SmolLM2')
    ax.legend(fontsize=7)


def _paired_bars(ax, rows: list[dict], ylabel: str, title: str) -> None:
    bars = ax.bar([r['name'] for r in rows], [r['ratio'] for r in rows], color='tab:blue')
    for bar, row in zip(bars, rows, strict=True):
        ax.annotate(f"{row['a_median']:.3g} / {row['b_median']:.3g} {row['unit']}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha='center', va='bottom', fontsize=8)
    ax.axhline(1.0, color='tab:red', linestyle='--')
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis='x', labelsize=7)


_PANELS: dict[str, Callable] = {'decode': _plot_decode, 'bench': _plot_bench,
                                'busy': _plot_busy, 'configure': _plot_configure}


def _print_summary(report: dict, out: Path) -> None:
    if report.get('decode'):
        print('\nmodel      scenario vocab   tokens constrained free   ratio  grammar ms/tok')
        for r in report['decode']:
            print(f"{r['model']:<10} {r['scenario']:<8} {r['n_vocab']:6d}  {r['tokens']:5d}"
                  f"  {r['a_median']:9.1f} {r['b_median']:6.1f}"
                  f"  {r['ratio']:5.3f}  {r['grammar_ms_per_token']:8.2f}")
    rows = [*report.get('bench', {}).get('rows', []), *report.get('busy', []),
            *report.get('configure', [])]
    if rows:
        print('\nmeasurement                     a            b            a/b')
        for r in rows:
            print(f"{r['name']:<31} {r['a_median']:8.3f} {r['unit']:<4}"
                  f"{r['b_median']:8.3f} {r['unit']:<4} {r['ratio']:6.3f}   "
                  f"({r['a_label']} / {r['b_label']})")
    print(f'wrote {out} and {out.with_suffix(".png")}')


if __name__ == '__main__':
    sys.exit(main())
