#!/usr/bin/env python3
"""Benchmark the torch backend: load time, resident memory and decode speed, BF16 vs FP8.

For each model size (the tiny test model, and a ~60M-parameter random NemotronH with hidden
size 1024) the same random weights are written as a BF16 checkpoint and in ModelOpt FP8
layout (:mod:`nemotron_ros.testing.tiny_hf`). Each checkpoint is then loaded by the torch
backend in a fresh Python process (so that memory figures are not polluted by the previous
model) and measured:

* ``load_s``: ``TorchBackend.load()`` (tensor reading, FP8 checks and dequantization,
  tokenizer and grammar compiler), after torch, transformers and xgrammar are imported
  (``import_s``, shared by every model);
* ``rss_delta_mb`` / ``peak_rss_delta_mb``: resident memory after the load and its peak
  during the load, relative to just before it (``rss_after_first_answer_delta_mb`` adds the
  caches and buffers of one generation);
* ``decode_tok_s``: greedy unconstrained decoding of ``--tokens`` tokens (EOS banned), median
  of ``--repeats`` runs; ``prefill_tok_s`` likewise for the prompt.

On a CPU an FP8 checkpoint is dequantized at load, so it should decode like BF16 and use the
same memory; the point of the CPU rows is to show that it does, and what dequantizing costs
at load time. With ``--dtypes bfloat16,float32`` the float32 compute rows show what a CPU
without native BF16 gains from it. On a GPU with FP8 tensor cores (``--device cuda``) the FP8
rows use ``torch._scaled_mm`` instead.

    python benchmarks/bench_torch.py                          # CPU, tiny + mid, bfloat16
    python benchmarks/bench_torch.py --dtypes bfloat16,float32 --threads 2
    python benchmarks/bench_torch.py --device cuda --sizes mid
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nemotron_ros.testing.tiny_hf import MID_HF_PRESET, tiny_hf_path  # noqa: E402

SIZES: dict[str, Mapping[str, object]] = {'tiny': {}, 'mid': MID_HF_PRESET}
PROMPT = ('You are the language interface of a mobile robot.',
          'Bring the red cup to the kitchen table, then go back to the charging dock.')


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_measure(args)))
        return 0
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix='bench_torch_'))
    rows = []
    for size in args.sizes.split(','):
        paths = _checkpoints(model_dir, size)
        for dtype in args.dtypes.split(','):
            for variant in ('bf16', 'fp8'):
                row = _run_worker(args, paths[variant], dtype)
                row.update(size=size, checkpoint=variant,
                           checkpoint_mb=round(_size_mb(paths[variant]), 1),
                           parameters=_parameters(paths['bf16']))
                rows.append(row)
                print(f"{size:5s} {variant:4s} {dtype:9s} {row['fp8_mode']:11s} load "
                      f"{row['load_s']:6.2f} s  rss +{row['rss_delta_mb']:7.1f} MB "
                      f"(peak +{row['peak_rss_delta_mb']:7.1f})  decode "
                      f"{row['decode_tok_s']:7.1f} tok/s", flush=True)
    report = {
        'benchmark': 'bench_torch',
        'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(),
                    'python': platform.python_version(), **_versions()},
        'settings': {'device': args.device, 'threads': args.threads, 'tokens': args.tokens,
                     'repeats': args.repeats},
        'results': rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')
    print(f'wrote {out}')
    return 0


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', default='tiny,mid', help='comma list of: tiny, mid')
    parser.add_argument('--dtypes', default='bfloat16', help='compute dtypes, comma list')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--tokens', type=int, default=64, help='decoded tokens per run')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--model-dir', help='where checkpoints are built (default: a temp dir)')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' /
                                             'bench_torch.json'))
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--dtype', default='bfloat16', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _checkpoints(model_dir: Path, size: str) -> dict[str, Path]:
    started = time.monotonic()
    paths = {'bf16': tiny_hf_path(model_dir, **SIZES[size]),
             'fp8': tiny_hf_path(model_dir, fp8=True, **SIZES[size])}
    print(f'{size}: checkpoints ready in {time.monotonic() - started:.1f} s', flush=True)
    return paths


def _run_worker(args: argparse.Namespace, path: Path, dtype: str) -> dict[str, Any]:
    command = [sys.executable, __file__, '--worker', str(path), '--dtype', dtype,
               '--device', args.device, '--threads', str(args.threads),
               '--tokens', str(args.tokens), '--repeats', str(args.repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    if done.returncode != 0:
        raise RuntimeError(f'worker for {path} failed:\n{done.stderr[-3000:]}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    # Everything a load imports lazily, so that load_s and the RSS delta are the model's.
    import xgrammar  # noqa: F401
    from transformers import AutoTokenizer, DynamicCache, NemotronHForCausalLM  # noqa: F401

    from nemotron_ros.engine.backends.torch.backend import TorchBackend, TorchConfig
    from nemotron_ros.engine.tools import ToolRegistry
    from nemotron_ros.engine.types import GenerationRequest, Message, SamplingParams

    backend = TorchBackend(TorchConfig(model_path=args.worker, device=args.device,
                                       dtype=args.dtype, n_threads=args.threads),
                           ToolRegistry())
    import_s = time.monotonic() - started
    rss_before, peak_before = _rss_mb(), _peak_rss_mb()
    started = time.monotonic()
    backend.load()
    load_s = time.monotonic() - started
    rss_after, peak_after = _rss_mb(), _peak_rss_mb()
    request = GenerationRequest(
        messages=[Message('system', PROMPT[0]), Message('user', PROMPT[1])], constrained=False,
        sampling=SamplingParams(max_tokens=args.tokens, ignore_eos=True))
    backend.generate(request)
    rss_warm = _rss_mb()
    decode, prefill = [], []
    for _ in range(args.repeats):
        usage = backend.generate(request).usage
        decode.append(usage.tokens_per_second)
        prefill.append(usage.prompt_tokens / max(usage.prefill_s, 1e-9))
    return {
        'dtype': args.dtype, 'device': args.device, 'fp8_mode': backend.fp8_mode,
        'import_s': round(import_s, 3), 'load_s': round(load_s, 3),
        'rss_delta_mb': round(rss_after - rss_before, 1),
        # ru_maxrss is the process's lifetime peak: it says something only if the load raised it.
        'peak_rss_delta_mb': round(max(peak_after - rss_before if peak_after > peak_before
                                       else 0.0, rss_after - rss_before), 1),
        'rss_after_first_answer_delta_mb': round(rss_warm - rss_before, 1),
        'decode_tok_s': round(statistics.median(decode), 1),
        'decode_tok_s_runs': [round(v, 1) for v in decode],
        'prefill_tok_s': round(statistics.median(prefill), 1),
        'prompt_tokens': usage.prompt_tokens,
    }


def _rss_mb() -> float:
    with open('/proc/self/statm') as stream:
        pages = int(stream.read().split()[1])
    return pages * os.sysconf('SC_PAGE_SIZE') / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob('*.safetensors')) / 2**20


def _parameters(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / 'model.safetensors'), framework='pt') as handle:
        for name in handle.keys():
            count = 1
            for dim in handle.get_slice(name).get_shape():
                count *= dim
            total += count
    return total


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for name in ('torch', 'transformers', 'xgrammar'):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = 'not installed'
    return out


if __name__ == '__main__':
    sys.exit(main())
