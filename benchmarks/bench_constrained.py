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
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nemotron_ros.engine.backends.llama.backend import LlamaBackend, LlamaConfig  # noqa: E402
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
class DecodeRow:
    """Constrained and unconstrained decode rates of one model and scenario."""

    model: str
    scenario: str
    n_vocab: int = 0
    tokens: int = 0
    constrained_tok_s: list[float] = field(default_factory=list)
    unconstrained_tok_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        con = statistics.median(self.constrained_tok_s)
        free = statistics.median(self.unconstrained_tok_s)
        return {**asdict(self), 'constrained_median_tok_s': con,
                'unconstrained_median_tok_s': free, 'ratio': con / free if free else 0.0,
                'grammar_ms_per_token': 1e3 / con - 1e3 / free if con and free else 0.0}


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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')
    _plot(report, out.with_suffix('.png'))
    _print_summary(report, out)
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
    parser.add_argument('--reps', type=int, default=5, help='interleaved repetitions')
    parser.add_argument('--threads', type=int, default=1, help='llama.cpp threads')
    parser.add_argument('--tokens', type=int, default=64, help='most tokens per decode run')
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


@contextmanager
def _backend(path: str, threads: int, n_ctx: int = 4096,
             prefix_cache: bool = True) -> Iterator[LlamaBackend]:
    backend = LlamaBackend(LlamaConfig(model_path=path, n_ctx=n_ctx, n_threads=threads,
                                       prefix_cache=prefix_cache), TOOLS)
    backend.load()
    try:
        yield backend
    finally:
        backend.unload()


def _interleaved(rep: int, arms: Sequence[Callable[[], None]]) -> None:
    """Run every arm once, starting from a different one on each repetition."""
    for index in range(len(arms)):
        arms[(rep + index) % len(arms)]()


# -- constrained vs unconstrained decode ----------------------------------------------------
def _measure_decode(name: str, path: str, args: argparse.Namespace) -> list[DecodeRow]:
    rows = []
    with _backend(path, args.threads) as backend:
        for scenario in args.scenarios:
            row = DecodeRow(name, scenario, n_vocab=backend.info.n_vocab)
            if not _decode_runs(backend, row, args):
                print(f'  {name} {scenario}: only {row.tokens} constrained tokens, skipped')
                continue
            summary = row.summary()
            print(f"  {name:<10} {scenario:<5} {row.tokens:3d} tokens: constrained "
                  f"{summary['constrained_median_tok_s']:6.1f} tok/s, unconstrained "
                  f"{summary['unconstrained_median_tok_s']:6.1f} tok/s, ratio "
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
        _interleaved(rep, (lambda: run(True, row.constrained_tok_s, args.tokens),
                           lambda: run(False, row.unconstrained_tok_s, row.tokens)))
    return True


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


_PANELS: dict[str, Callable] = {'decode': _plot_decode}


def _print_summary(report: dict, out: Path) -> None:
    if report.get('decode'):
        print('\nmodel      scenario vocab   tokens constrained free   ratio  grammar ms/tok')
        for r in report['decode']:
            print(f"{r['model']:<10} {r['scenario']:<8} {r['n_vocab']:6d}  {r['tokens']:5d}"
                  f"  {r['constrained_median_tok_s']:9.1f} {r['unconstrained_median_tok_s']:6.1f}"
                  f"  {r['ratio']:5.3f}  {r['grammar_ms_per_token']:8.2f}")
    print(f'wrote {out} and {out.with_suffix(".png")}')


if __name__ == '__main__':
    sys.exit(main())
