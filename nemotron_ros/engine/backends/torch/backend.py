"""The PyTorch backend: Hugging Face NemotronH checkpoints in BF16 or ModelOpt FP8.

Why a second runtime: NVIDIA ships Nemotron 3 Nano as a ModelOpt FP8 checkpoint that runs up
to 1.8x faster than BF16 on GPUs with FP8 tensor cores, which llama.cpp cannot read. This
backend loads such a directory (or a BF16 one) with :mod:`.checkpoint`, runs
transformers' own NemotronH modelling code, and keeps every guarantee of the llama.cpp
backend behind the same :class:`~.backend.Backend` interface:

* the prompt is the model's native format (:func:`.prompt_format.select_prompt_format`, so
  Nemotron's own ChatML layout with the tool list in the system turn);
* tool calls are constrained by the engine's one grammar (:func:`.grammar.build_grammar`),
  run by xgrammar (:mod:`.xgrammar_constraint`), then parsed and re-validated by
  :func:`.tool_parser.parse_output` / :func:`.tool_parser.validate_calls`; output cut by
  ``max_tokens``, a deadline or a cancel never yields a tool call;
* the absolute ``time.monotonic()`` deadline and the cancel token are checked before every
  prefill chunk and every token, so a long prompt is interruptible too;
* text is streamed to ``on_token`` as complete UTF-8, and :class:`~.types.Usage` gets the
  same counters and timings.

Like the llama.cpp backend it reuses the fixed prefix (system prompt + tools): the hybrid
cache after the prefix is kept and deep-copied for each request (Mamba state plus the few
attention layers' keys and values), so only the new tokens are evaluated.

The decode loop is this module's own rather than ``generate()``: it needs the deadline and
cancel checks, streaming and grammar state per token, and one forward per token through
transformers' hybrid cache is what ``generate()`` does too.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ... import settings
from ...prompt_format import select_prompt_format, vocab_markers
from ...tools import ToolRegistry
from ...types import CancelToken, FinishReason, GenerationRequest, GenerationResult, Usage
from ..base import Backend, BackendError, ModelGuard, ModelInfo, Stopper
from ..decoding import TokenStream
from .checkpoint import CheckpointError, load_checkpoint
from .sampling import Sampler
from .xgrammar_constraint import GrammarBackend, RequestGrammar

DTYPES = {'auto': torch.bfloat16, 'bfloat16': torch.bfloat16, 'float16': torch.float16,
          'float32': torch.float32}


@dataclass
class TorchConfig:
    """Settings of the torch backend; plain types only, so ROS parameters map onto them.

    :param model_path: a local Hugging Face checkpoint directory (BF16 or ModelOpt FP8).
    :param device: 'auto' (the first CUDA GPU if there is one, else the CPU), 'cpu',
        'cuda' or 'cuda:N'.
    :param dtype: compute dtype: 'auto' (= 'bfloat16'), 'bfloat16', 'float16' or 'float32'.
        On CPUs without native BF16 (no AVX512-BF16/AMX) 'float32' can decode faster, at
        twice the memory (benchmarks/bench_torch.py measures both).
    :param fp8: for FP8 checkpoints: 'auto' (FP8 matmuls on CUDA compute capability >= 8.9,
        dequantize elsewhere), 'dequantize' or 'scaled_mm' (FP8 matmuls anywhere; slow on a
        CPU, for tests).
    :param n_ctx: most tokens of prompt plus answer.
    :param n_threads: CPU threads for torch; 0 = one less than the CPU count (at least 1).
    :param prefill_chunk: prompt tokens per forward pass; the deadline and cancel are
        checked between chunks.
    :param prefix_cache: keep the state after system prompt + tools and reuse it.
    """

    model_path: str
    device: str = settings.default('device')
    dtype: str = 'auto'
    fp8: str = settings.default('fp8')
    n_ctx: int = settings.default('n_ctx')
    n_threads: int = settings.default('n_threads')
    prefill_chunk: int = 256
    prefix_cache: bool = settings.default('prefix_cache')

    def __post_init__(self) -> None:
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ValueError('model_path must name a checkpoint directory, got '
                             f'{self.model_path!r}')
        # The node's parameters: types, defaults and limits are the table's (settings.py).
        for name in ('device', 'fp8', 'n_ctx', 'n_threads', 'prefix_cache'):
            settings.check(name, getattr(self, name))
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ValueError(f'dtype must be one of {", ".join(DTYPES)}; got {self.dtype!r}')
        if isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) \
                or self.prefill_chunk < 1:
            raise ValueError(f'prefill_chunk must be an integer >= 1, got {self.prefill_chunk!r}')

    def torch_device(self) -> torch.device:
        if self.device == 'auto':
            return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class _Loaded:
    """Everything a loaded model needs at generation time."""

    model: Any
    tokenizer: Any
    grammars: GrammarBackend
    token_bytes: list[bytes]
    stop_ids: frozenset[int]
    unused_ids: list[int]
    device: torch.device
    fp8: str


class TorchBackend(Backend):
    """Hugging Face NemotronH checkpoints through PyTorch; see the module docstring."""

    def __init__(self, config: TorchConfig, tools: ToolRegistry) -> None:
        super().__init__(tools)
        self.config = config
        self._guard = ModelGuard()
        self._state: Optional[_Loaded] = None
        self._prefix: Optional[tuple[list[int], Any]] = None
        self.info: Optional[ModelInfo] = None

    # -- lifecycle ------------------------------------------------------------------------
    def load(self, cancel: Optional[CancelToken] = None) -> ModelInfo:
        if self._state is not None:
            return self.info
        path = Path(self.config.model_path)
        device = self.config.torch_device()
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise BackendError(f'{path}: device {self.config.device!r} asked for, but this '
                               'torch has no CUDA device')
        if device.type == 'cpu':
            torch.set_num_threads(self.config.n_threads or max(1, (os.cpu_count() or 2) - 1))
        try:
            loaded = load_checkpoint(path, device, self.config.torch_dtype(), self.config.fp8)
            if cancel is not None and cancel.cancelled:
                raise BackendError(f'loading {path} was aborted')
            tokenizer = _load_tokenizer(path)
            config = loaded.config
            self.prompt_format = select_prompt_format(
                {'general.architecture': config.model_type,
                 'tokenizer.chat_template': getattr(tokenizer, 'chat_template', None) or ''},
                bos_token=tokenizer.bos_token or '', eos_token=tokenizer.eos_token or '',
                special_tokens=vocab_markers(tokenizer.all_special_tokens,
                                             tokenizer.get_added_vocab()))
            n_vocab = int(config.vocab_size)
            stop_ids = _stop_ids(tokenizer, config, path)
            grammars = GrammarBackend(tokenizer, n_vocab, sorted(stop_ids),
                                      threads=self.config.n_threads or 1)
        except CheckpointError as exc:
            raise BackendError(str(exc)) from exc
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f'{path}: {exc}') from exc
        self._state = _Loaded(
            model=loaded.model, tokenizer=tokenizer, grammars=grammars,
            token_bytes=_token_bytes(grammars, tokenizer), stop_ids=frozenset(stop_ids),
            unused_ids=list(range(len(tokenizer), n_vocab)), device=device, fp8=loaded.fp8)
        self._prefix = None
        recurrent = any(kind == 'linear_attention' for kind in config.layers_block_type)
        self.info = ModelInfo(path=str(path), architecture=config.model_type,
                              chat_format=self.prompt_format.name, n_ctx=self.config.n_ctx,
                              n_vocab=n_vocab, recurrent=recurrent)
        self._guard.open()
        return self.info

    def unload(self) -> None:
        """Free the model once no generation or count uses it any more (waits for them)."""
        self._guard.retire()
        on_cuda = self._state is not None and self._state.device.type == 'cuda'
        self._state = None
        self._prefix = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    @property
    def loaded(self) -> bool:
        return self._state is not None

    @property
    def fp8_mode(self) -> str:
        """How FP8 weights run: 'none', 'dequantized' or 'scaled_mm'."""
        return self._require().fp8

    @property
    def model(self) -> Any:
        """The loaded transformers model (for diagnostics and tests)."""
        return self._require().model

    def count_tokens(self, text: str) -> int:
        with self._guard.use():
            return len(self._encode(text))

    def reuses_prefix(self, prefix: str) -> bool:
        cached_text, tokens = self._prefix_encoding
        kept = self._prefix
        return bool(self.config.prefix_cache and prefix and kept is not None
                    and prefix == cached_text and tokens == kept[0])

    def _require(self) -> _Loaded:
        if self._state is None:
            raise BackendError('no model is loaded')
        return self._state

    def _encode(self, text: str) -> list[int]:
        return list(self._require().tokenizer.encode(text, add_special_tokens=False))

    # -- generation -----------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> GenerationResult:
        with self._guard.use():
            return self._generate(self._require(), request)

    def _generate(self, state: _Loaded, request: GenerationRequest) -> GenerationResult:
        started = time.monotonic()
        prepared = self.prepare(request, self._encode, self.config.n_ctx)
        usage = prepared.usage
        grammar = None
        if prepared.grammar is not None:
            grammar = state.grammars.start(prepared.grammar, state.device)
        banned = list(state.unused_ids)
        if grammar is None and request.sampling.ignore_eos:
            banned += sorted(state.stop_ids)
        stopper = Stopper(request)
        result = GenerationResult(usage=usage)
        with torch.inference_mode():
            prefilled = self._prefill(state, prepared.prefix, prepared.suffix, usage, stopper)
            usage.prefill_s = time.monotonic() - started
            if prefilled is None:
                result.finish_reason = stopper.reason or FinishReason.CANCELLED
                usage.total_s = usage.prefill_s
                return result
            sampler = Sampler(request.sampling, state.device, banned)
            raw, finish, error = self._decode_loop(
                state, prefilled, sampler, grammar, prepared.max_tokens, stopper, usage, started,
                request.on_token)
        usage.total_s = time.monotonic() - started
        result.raw_text = raw
        result.finish_reason = finish
        result.error = error
        return self.finish(result, prepared)

    def _prefill(self, state: _Loaded, prefix: list[int], suffix: list[int], usage: Usage,
                 stopper: Stopper) -> Optional[tuple[Any, torch.Tensor]]:
        """(cache, last logits) at the end of the prompt, or None when stopped on the way."""
        if not self.config.prefix_cache or not prefix:
            cache = _new_cache(state.model)
            logits = self._feed(state, prefix + suffix, cache, stopper)
            return None if logits is None else (cache, logits)
        if self._prefix is not None and self._prefix[0] == prefix:
            usage.prompt_tokens_reused = len(prefix)
            cache = copy.deepcopy(self._prefix[1])
        else:
            self._prefix = None
            cache = _new_cache(state.model)
            if self._feed(state, prefix, cache, stopper) is None:
                return None
            self._prefix = (list(prefix), copy.deepcopy(cache))
        logits = self._feed(state, suffix, cache, stopper)
        return None if logits is None else (cache, logits)

    def _feed(self, state: _Loaded, tokens: Sequence[int], cache: Any,
              stopper: Callable[[], bool]) -> Optional[torch.Tensor]:
        """Run ``tokens`` through the model in chunks; the last token's logits, or None."""
        logits = None
        step = self.config.prefill_chunk
        for start in range(0, len(tokens), step):
            if stopper():
                return None
            logits = _forward(state, tokens[start:start + step], cache)
        return logits

    def _decode_loop(self, state: _Loaded, prefilled: tuple[Any, torch.Tensor],
                     sampler: Sampler, grammar: Optional[RequestGrammar], max_tokens: int,
                     stopper: Stopper, usage: Usage, started: float,
                     on_token: Optional[Callable[[str], None]]
                     ) -> tuple[str, FinishReason, str]:
        """Sample until a stop token, max_tokens, the deadline or a cancel.

        Returns (text, finish reason, error message).
        """
        cache, logits = prefilled
        stream = TokenStream(usage, started, on_token)
        finish, error = FinishReason.LENGTH, ''
        for _ in range(max_tokens):
            if stopper():
                finish = stopper.reason
                break
            if grammar is not None:
                grammar.mask(logits)
            if not bool(torch.isfinite(logits).any()):
                finish, error = FinishReason.ERROR, 'no token is allowed next'
                break
            token = sampler.sample(logits)
            stream.first_token()
            if token in state.stop_ids:
                finish = FinishReason.STOP
                break
            if grammar is not None and not grammar.accept(token):
                finish, error = FinishReason.ERROR, f'the grammar refused token {token}'
                break
            sampler.accept(token)
            stream.add_bytes(state.token_bytes[token])
            logits = _forward(state, [token], cache)
        return stream.finish(), finish, error


def _forward(state: _Loaded, tokens: Sequence[int], cache: Any) -> torch.Tensor:
    """Feed ``tokens`` after what ``cache`` holds; the float32 logits of the last one."""
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=state.device)
    out = state.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float()


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f'{path}: cannot load the tokenizer: {exc}') from exc


def _token_bytes(grammars: GrammarBackend, tokenizer: Any) -> list[bytes]:
    """The text bytes of every token id; the tokenizer's special tokens write nothing.

    ``<think>``, ``<tool_call>`` and their closing tags are plain added tokens in Nemotron's
    tokenizer and keep their text, which the parser reads.
    """
    table = grammars.token_bytes()
    for token in tokenizer.all_special_ids:
        if 0 <= token < len(table):
            table[token] = b''
    return table


def _stop_ids(tokenizer: Any, config: Any, path: Path) -> set[int]:
    """Every end-of-generation id: the tokenizer's eos, ``<|im_end|>`` and the configs' eos."""
    ids: set[int] = set()
    generation = {}
    try:
        generation = json.loads((path / 'generation_config.json').read_text(encoding='utf-8'))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise CheckpointError(f'{path}/generation_config.json: unreadable: {exc}') from exc
    for value in (tokenizer.eos_token_id, getattr(config, 'eos_token_id', None),
                  generation.get('eos_token_id')):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    im_end = tokenizer.convert_tokens_to_ids('<|im_end|>')
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    if not ids:
        raise CheckpointError(f'{path}: the tokenizer and config name no end-of-sequence token')
    return ids
