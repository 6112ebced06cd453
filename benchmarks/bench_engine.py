#!/usr/bin/env python3
"""Benchmark the llama.cpp engine: what prefix reuse saves, and what the engine's loop costs.

Two measurements, each run side by side (interleaved, alternating which goes first) so that
load from other processes hits both arms alike, and reported as medians:

* **Time to first token** with and without prefix reuse (``LlamaConfig(prefix_cache=...)``):
  a fixed prefix (system prompt + tools) of about ``--sizes`` tokens and a short user request
  (20-40 tokens). With reuse, the state after the prefix is copied from a kept sequence and
  only the request is evaluated; without it, the whole prompt is. The prefix sizes are the
  measured ones (``Usage.prompt_tokens_reused``), the times ``Usage.time_to_first_token_s``
  (from the call of ``generate``: rendering and tokenizing the prompt included).
* **Decode speed** of ``LlamaBackend.generate`` (unconstrained, greedy, EOS banned, ``--tokens``
  tokens; ``Usage.tokens_per_second``) divided by a bare llama-cpp-python loop
  (``Llama.generate`` at temperature 0) on the same model, prompt, token count and threads.
  A ratio near 1 means the engine's per-token work (sampler chain, UTF-8 decoding, deadline
  and cancel checks) costs nothing measurable next to the model. Both arms run with the same
  ``--flash-attn`` (``Llama`` knows on and off only, not the engine's default ``auto``).

Models: ``tiny`` (the random ~0.7 MB ``nemotron_h`` the tests use), ``mid`` (``MID_PRESET``,
~25M parameters), ``real_mixer`` (``REAL_MIXER_PRESET``: the real 4B's Mamba-2 state size),
``smollm2`` (SmolLM2-135M-Instruct, a real model through its own chat template), or a path.
Writes ``--out`` (JSON) and a PNG next to it.

    python benchmarks/bench_engine.py                                   # tiny, mid, smollm2
    python benchmarks/bench_engine.py --reps 5 --sizes 256,1024,4096 --models tiny,smollm2
    python benchmarks/bench_engine.py --models real_mixer --threads 4 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
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
from nemotron_ros.engine.types import GenerationRequest, Message, SamplingParams  # noqa: E402

TOOLS = ToolRegistry.from_yaml(ROOT / 'config' / 'tools.example.yaml')
SYSTEM = 'You are the language interface of a mobile robot in a small apartment.'
FILLER = ('Map note {i}: the corridor between the kitchen and the living room is clear, the '
          'charging dock stands by the entrance, and the table is two metres from the shelf.')
REQUEST_SENTENCES = ('Please go to the kitchen,', 'look for the red cup on the counter,',
                     'and tell me whether it is still there.', 'Then come back to the entrance.',
                     'Drive slowly near people.')
REQUEST_TOKENS = (20, 40)
DECODE_PROMPT = 'Tell me a long story about a robot that explores an old house.'


@dataclass
class TtftRow:
    """Time to first token for one model and prefix size, both arms."""

    model: str
    target_prefix_tokens: int
    prefix_tokens: int = 0
    request_tokens: int = 0
    tools: list[str] = field(default_factory=list)
    reuse_ms: list[float] = field(default_factory=list)
    no_reuse_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        reuse, full = statistics.median(self.reuse_ms), statistics.median(self.no_reuse_ms)
        return {**asdict(self), 'reuse_median_ms': reuse, 'no_reuse_median_ms': full,
                'speedup': full / reuse if reuse > 0 else 0.0}


@dataclass
class DecodeRow:
    """Decode tokens/s of the engine and of the bare loop for one model."""

    model: str
    tokens: int
    prompt_tokens: int = 0
    engine_prompt_tokens: int = 0
    engine_tok_s: list[float] = field(default_factory=list)
    bare_tok_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        engine, bare = statistics.median(self.engine_tok_s), statistics.median(self.bare_tok_s)
        return {**asdict(self), 'engine_median_tok_s': engine, 'bare_median_tok_s': bare,
                'ratio': engine / bare if bare > 0 else 0.0}


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    ttft_rows: list[TtftRow] = []
    decode_rows: list[DecodeRow] = []
    models = {}
    for name in args.models:
        path = _model_path(name)
        models[name] = str(path)
        print(f'== {name}: {path}', flush=True)
        if not args.skip_ttft:
            ttft_rows += _measure_ttft(name, str(path), args)
        if not args.skip_decode:
            decode_rows.append(_measure_decode(name, str(path), args))
    report = {
        'machine': {'python': platform.python_version(), 'platform': platform.platform(),
                    'threads': args.threads, 'flash_attn': args.flash_attn},
        'args': {'reps': args.reps, 'decode_reps': args.decode_reps, 'sizes': args.sizes,
                 'tokens': args.tokens, 'models': models},
        'ttft': [row.summary() for row in ttft_rows],
        'decode': [row.summary() for row in decode_rows],
    }
    write_report(report, Path(args.out), _plot, _print_summary)
    return 0


def write_report(report: dict, out: Path, plot: Callable[[dict, Path], None],
                 print_summary: Callable[[dict, Path], None]) -> None:
    """Write ``report`` as JSON to ``out``, its plot as PNG beside it, then print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')
    plot(report, out.with_suffix('.png'))
    print_summary(report, out)


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', type=_names, default=['tiny', 'mid', 'smollm2'],
                        help="comma-separated: tiny, mid, real_mixer, smollm2 or GGUF paths")
    parser.add_argument('--sizes', type=_ints, default=[256, 512, 1024, 2048, 4096],
                        help='comma-separated target prefix sizes in tokens')
    parser.add_argument('--reps', type=int, default=3,
                        help='repetitions of each time-to-first-token measurement')
    parser.add_argument('--decode-reps', type=int, default=7,
                        help='repetitions of each decode measurement (cheap, and noisier)')
    parser.add_argument('--threads', type=int, default=2, help='llama.cpp threads (both arms)')
    parser.add_argument('--tokens', type=int, default=128, help='tokens per decode run')
    parser.add_argument('--flash-attn', choices=('on', 'off'), default='off',
                        help="flash attention in every context (the bare loop has no 'auto')")
    parser.add_argument('--skip-ttft', action='store_true')
    parser.add_argument('--skip-decode', action='store_true')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' /
                                             'bench_engine.json'))
    args = parser.parse_args(argv)
    if min(args.reps, args.decode_reps, args.threads) < 1 or args.tokens < 2:
        parser.error('--reps, --decode-reps and --threads must be >= 1, --tokens >= 2')
    return args


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(',') if part.strip()]


def _ints(text: str) -> list[int]:
    return [int(part) for part in _names(text)]


def _model_path(name: str) -> Path:
    from nemotron_ros.testing import MID_PRESET, REAL_MIXER_PRESET
    from nemotron_ros.testing.models import smollm2_gguf_path, tiny_nemotron_h_path

    cache = Path(tempfile.gettempdir()) / 'nemotron_ros_bench'
    presets = {'tiny': {}, 'mid': dict(MID_PRESET), 'real_mixer': dict(REAL_MIXER_PRESET)}
    if name in presets:
        return tiny_nemotron_h_path(cache, **presets[name])
    if name == 'smollm2':
        return smollm2_gguf_path()
    return Path(name)


@contextmanager
def _backend(args: argparse.Namespace, path: str, n_ctx: int,
             prefix_cache: bool) -> Iterator[LlamaBackend]:
    backend = LlamaBackend(LlamaConfig(model_path=path, n_ctx=n_ctx, n_threads=args.threads,
                                       flash_attn=args.flash_attn, prefix_cache=prefix_cache),
                           TOOLS)
    backend.load()
    try:
        yield backend
    finally:
        backend.unload()


def _interleaved(rep: int, arms: Sequence[Callable[[], None]]) -> None:
    """Run every arm once, starting from a different one on each repetition."""
    for index in range(len(arms)):
        arms[(rep + index) % len(arms)]()


# -- time to first token --------------------------------------------------------------------
def _measure_ttft(name: str, path: str, args: argparse.Namespace) -> list[TtftRow]:
    n_ctx = max(args.sizes) + 512
    rows = []
    with _backend(args, path, n_ctx, True) as reuse, _backend(args, path, n_ctx, False) as full:
        request = _request_text(reuse)
        for target in args.sizes:
            row = TtftRow(name, target)
            row.tools, system = _prefix_for(reuse, request, target)
            _ttft_runs(row, [Message('system', system), Message('user', request)], reuse, full,
                       args.reps)
            summary = row.summary()
            print(f'  ttft prefix {row.prefix_tokens:5d} (+{row.request_tokens} request): '
                  f"reuse {summary['reuse_median_ms']:8.2f} ms, none "
                  f"{summary['no_reuse_median_ms']:8.2f} ms, x{summary['speedup']:.1f}",
                  flush=True)
            rows.append(row)
    return rows


def _ttft_runs(row: TtftRow, messages: list[Message], reuse: LlamaBackend, full: LlamaBackend,
               reps: int) -> None:
    def run(backend: LlamaBackend, times: list[float]) -> None:
        usage = backend.generate(GenerationRequest(
            messages=messages, tools=row.tools, constrained=False,
            sampling=SamplingParams(max_tokens=1, ignore_eos=True))).usage
        times.append(usage.time_to_first_token_s * 1e3)
        if usage.prompt_tokens_reused:
            row.prefix_tokens = usage.prompt_tokens_reused
            row.request_tokens = usage.prompt_tokens - usage.prompt_tokens_reused

    run(reuse, [])  # builds the kept prefix: a warm-up, not a measurement
    for rep in range(reps):
        _interleaved(rep, (lambda: run(reuse, row.reuse_ms),
                           lambda: run(full, row.no_reuse_ms)))


def _request_text(backend: LlamaBackend) -> str:
    """A user request of REQUEST_TOKENS tokens in this model's tokenizer."""
    low, high = REQUEST_TOKENS
    words: list[str] = []
    for sentence in REQUEST_SENTENCES * 4:
        for word in sentence.split():
            if backend.count_tokens(' '.join(words + [word])) > high:
                return ' '.join(words)
            words.append(word)
            if backend.count_tokens(' '.join(words)) >= (low + high) // 2:
                return ' '.join(words)
    return ' '.join(words)


def _prefix_for(backend: LlamaBackend, request: str, target: int) -> tuple[list[str], str]:
    """(tools, system prompt) whose rendered prefix has about ``target`` tokens.

    Tools are taken in registry order while the prefix stays within half the target; map
    notes in the system prompt fill the rest.
    """
    def prefix_tokens(tools: list[str], notes: list[str]) -> int:
        messages = [Message('system', ' '.join([SYSTEM, *notes])), Message('user', request)]
        rendered = backend.prompt_format.render(messages, TOOLS.subset(tools))
        return backend.count_tokens(rendered.prefix)

    tools: list[str] = []
    for name in TOOLS.names:
        if prefix_tokens(tools + [name], []) > target // 2:
            break
        tools.append(name)
    notes: list[str] = []
    while True:
        note = FILLER.format(i=len(notes) + 1)
        if prefix_tokens(tools, notes + [note]) > target:
            break
        notes.append(note)
    return tools, ' '.join([SYSTEM, *notes])


# -- decode speed ---------------------------------------------------------------------------
def _measure_decode(name: str, path: str, args: argparse.Namespace) -> DecodeRow:
    import llama_cpp

    n_ctx = 512 + args.tokens
    row = DecodeRow(name, args.tokens)
    with _backend(args, path, n_ctx, True) as engine:
        bare = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=args.threads,
                               n_threads_batch=args.threads,
                               flash_attn=args.flash_attn == 'on', verbose=False)
        try:
            messages = [Message('system', SYSTEM), Message('user', DECODE_PROMPT)]
            text = engine.prompt_format.render(messages).text
            tokens = bare.tokenize(text.encode('utf-8'), add_bos=False, special=True)
            row.prompt_tokens = len(tokens)

            def run_engine(rates: list[float]) -> None:
                usage = engine.generate(GenerationRequest(
                    messages=messages, constrained=False,
                    sampling=SamplingParams(max_tokens=args.tokens, ignore_eos=True))).usage
                if usage.completion_tokens != args.tokens:
                    raise RuntimeError(f'engine stopped early: {usage}')
                row.engine_prompt_tokens = usage.prompt_tokens
                rates.append(usage.tokens_per_second)

            def run_bare(rates: list[float]) -> None:
                rates.append(_bare_tokens_per_second(bare, tokens, args.tokens))

            run_engine([])  # warm-ups, not measurements
            run_bare([])
            for rep in range(args.decode_reps):
                _interleaved(rep, (lambda: run_engine(row.engine_tok_s),
                                   lambda: run_bare(row.bare_tok_s)))
        finally:
            bare.close()
    summary = row.summary()
    print(f"  decode {args.tokens} tokens: engine {summary['engine_median_tok_s']:.1f} tok/s,"
          f" bare {summary['bare_median_tok_s']:.1f} tok/s, ratio {summary['ratio']:.3f}",
          flush=True)
    return row


def _bare_tokens_per_second(bare, tokens: list[int], count: int) -> float:
    """(count - 1) / time from the first to the last token, like Usage.tokens_per_second."""
    first = 0.0
    produced = 0
    for _ in bare.generate(tokens, temp=0.0, reset=True):
        produced += 1
        if produced == 1:
            first = time.perf_counter()
        if produced == count:
            break
    return (count - 1) / (time.perf_counter() - first)


# -- report ---------------------------------------------------------------------------------
def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for model in dict.fromkeys(row['model'] for row in report['ttft']):
        rows = [r for r in report['ttft'] if r['model'] == model]
        sizes = [r['prefix_tokens'] for r in rows]
        line, = axes[0].plot(sizes, [r['no_reuse_median_ms'] for r in rows], marker='o',
                             label=f'{model}: no reuse')
        axes[0].plot(sizes, [r['reuse_median_ms'] for r in rows], marker='s', linestyle='--',
                     color=line.get_color(), label=f'{model}: prefix reuse')
    axes[0].set_xscale('log', base=2)
    axes[0].set_yscale('log')
    axes[0].set_xlabel('fixed prefix (system prompt + tools), tokens')
    axes[0].set_ylabel('time to first token, median (ms)')
    axes[0].set_title('time to first token with and without prefix reuse')
    axes[0].legend(fontsize=7)
    decode = report['decode']
    if decode:
        names = [r['model'] for r in decode]
        bars = axes[1].bar(names, [r['ratio'] for r in decode], color='tab:green')
        for bar, row in zip(bars, decode, strict=True):
            axes[1].annotate(f"{row['engine_median_tok_s']:.0f} / {row['bare_median_tok_s']:.0f}"
                             ' tok/s', (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                             ha='center', va='bottom', fontsize=8)
        axes[1].axhline(1.0, color='tab:red', linestyle='--')
        axes[1].set_ylabel('engine / bare llama-cpp-python decode speed')
        axes[1].set_title(f"decode, {decode[0]['tokens']} tokens, greedy, medians of "
                          f"{report['args']['decode_reps']} interleaved runs")
    fig.suptitle(f"engine benchmark, {report['machine']['threads']} threads, flash attention "
                 f"{report['machine']['flash_attn']}; time to first token: medians of "
                 f"{report['args']['reps']} interleaved runs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_summary(report: dict, out: Path) -> None:
    print('\nmodel        prefix  request  reuse ms  no-reuse ms  speedup')
    for row in report['ttft']:
        print(f"{row['model']:<12} {row['prefix_tokens']:6d}  {row['request_tokens']:7d}"
              f"  {row['reuse_median_ms']:8.2f}  {row['no_reuse_median_ms']:11.2f}"
              f"  {row['speedup']:7.1f}")
    print('\nmodel        engine tok/s  bare tok/s  ratio')
    for row in report['decode']:
        print(f"{row['model']:<12} {row['engine_median_tok_s']:12.1f}"
              f"  {row['bare_median_tok_s']:10.1f}  {row['ratio']:5.3f}")
    print(f'wrote {out} and {out.with_suffix(".png")}')


if __name__ == '__main__':
    sys.exit(main())
