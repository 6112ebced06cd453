"""The llama.cpp backend: GGUF models, grammar-constrained tool calls, deadlines, prefix reuse.

Hybrid Mamba/attention models such as Nemotron 3 cannot have their recurrent state partially
rolled back, so llama.cpp's own prompt caches re-process the whole prompt on every request.
This backend keeps the state after the fixed prefix (system prompt + tools) in sequence 1 of a
two-sequence context and copies it into sequence 0 for each request (``llama_memory_seq_cp``,
well under a millisecond), so time to first token depends on the new tokens only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from ... import settings
from ...prompt_format import select_prompt_format, vocab_markers
from ...tools import ToolRegistry
from ...types import (
    CancelToken,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Usage,
)
from ..base import Backend, BackendError, ModelGuard, ModelInfo, Stopper
from ..decoding import TokenStream
from .context import ContextOptions, DecodeAbortedError, LlamaContext, LlamaLoadError
from .sampler import FirstByteIndex, GrammarCache, SamplerChain
from .state_cache import PrefixStateCache

PREFIX_SEQ = 1
WORK_SEQ = 0


@dataclass
class LlamaConfig:
    """Settings of the llama.cpp backend.

    :param n_threads: decode threads; 0 = one less than the CPU count (at least 1).
    :param n_threads_batch: prompt evaluation threads; 0 = ``n_threads``.
    :param n_gpu_layers: layers offloaded to the GPU (-1 = all).
    :param flash_attn: 'auto', 'on' or 'off'.
    :param prefix_cache: keep the state after system prompt + tools and reuse it.
    :param state_cache_dir: also keep that state on disk across restarts ('' = off; the
        node's ``llama.state_cache_dir`` setting); see :mod:`.state_cache`.

    The settings the node exposes take their defaults and limits from :mod:`.settings`.
    """

    model_path: str
    n_ctx: int = settings.default('n_ctx')
    n_threads: int = settings.default('n_threads')
    n_threads_batch: int = 0
    n_gpu_layers: int = settings.default('n_gpu_layers')
    n_batch: int = settings.default('n_batch')
    flash_attn: str = settings.default('flash_attn')
    use_mmap: bool = True
    prefix_cache: bool = settings.default('prefix_cache')
    state_cache_dir: str = ''
    verbose: bool = False

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError('model_path must name a GGUF file, got an empty string')
        # The node's parameters: their defaults and limits are the table's (settings.py).
        for name in ('n_ctx', 'n_threads', 'n_gpu_layers', 'flash_attn', 'prefix_cache'):
            settings.check(name, getattr(self, name))
        settings.check_at_most_n_ctx('n_batch', self.n_batch, self.n_ctx)
        if self.n_threads_batch < 0:
            raise ValueError(f'n_threads_batch must be >= 0 (0 = n_threads), '
                             f'got {self.n_threads_batch}')

    def context_options(self) -> ContextOptions:
        threads = self.n_threads or max(1, (os.cpu_count() or 2) - 1)
        return ContextOptions(
            n_ctx=self.n_ctx, n_batch=self.n_batch, n_threads=threads,
            n_threads_batch=self.n_threads_batch or threads,
            n_gpu_layers=0x7FFFFFFF if self.n_gpu_layers == -1 else self.n_gpu_layers,
            n_seq_max=2 if self.prefix_cache else 1, flash_attn=self.flash_attn,
            use_mmap=self.use_mmap, verbose=self.verbose)


class LlamaBackend(Backend):
    """GGUF models through llama.cpp; see the module docstring for the prefix reuse.

    Thread-safe for one ``generate`` at a time plus any number of token counts; ``unload``
    waits for both to end before it frees the model (prefill chunks on a GPU and decode steps
    cannot be aborted half-way).
    """

    def __init__(self, config: LlamaConfig, tools: ToolRegistry) -> None:
        super().__init__(tools)
        self.config = config
        self._guard = ModelGuard()
        self._llm: Optional[LlamaContext] = None
        self._grammars: Optional[GrammarCache] = None
        self._first_bytes: Optional[FirstByteIndex] = None
        self._state_cache: Optional[PrefixStateCache] = None
        self._prefix_tokens: list[int] = []
        self.info: Optional[ModelInfo] = None

    # -- lifecycle ------------------------------------------------------------------------
    def load(self, cancel: Optional[CancelToken] = None) -> ModelInfo:
        if self._llm is not None:
            return self.info
        aborted = None if cancel is None else (lambda: cancel.cancelled)
        try:
            llm = LlamaContext(self.config.model_path, self.config.context_options(), aborted)
        except LlamaLoadError as exc:
            raise BackendError(str(exc)) from exc
        arch = llm.metadata('general.architecture') or 'unknown'
        try:
            self.prompt_format = select_prompt_format(
                {'general.architecture': arch, 'tokenizer.chat_template': llm.chat_template()},
                bos_token=llm.token_text(llm.bos), eos_token=llm.token_text(llm.eos),
                special_tokens=vocab_markers(*llm.special_token_texts()))
        except ValueError as exc:
            llm.close()
            raise BackendError(f'{self.config.model_path}: {exc}') from exc
        self._llm = llm
        self._grammars = GrammarCache(llm.vocab)
        self._first_bytes = None
        self._state_cache = None
        if self.config.prefix_cache and self.config.state_cache_dir:
            self._state_cache = PrefixStateCache(self.config.state_cache_dir, llm)
        self._prefix_tokens = []
        self.info = ModelInfo(
            path=self.config.model_path, architecture=arch, chat_format=self.prompt_format.name,
            n_ctx=llm.n_ctx, n_vocab=llm.n_vocab, recurrent=llm.recurrent)
        self._guard.open()
        return self.info

    def unload(self) -> None:
        """Free the model once no generation or count uses it any more (waits for them)."""
        self._guard.retire()
        if self._grammars is not None:
            self._grammars.close()
            self._grammars = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None
        self._prefix_tokens = []

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def count_tokens(self, text: str) -> int:
        with self._guard.use():
            return len(self._require().tokenize(text))

    def reuses_prefix(self, prefix: str) -> bool:
        cached_text, tokens = self._prefix_encoding
        kept = self._prefix_tokens
        return bool(self.config.prefix_cache and kept and prefix == cached_text
                    and tokens == kept)

    def _require(self) -> LlamaContext:
        if self._llm is None:
            raise BackendError('no model is loaded')
        return self._llm

    # -- generation -----------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> GenerationResult:
        with self._guard.use():
            return self._generate(self._require(), request)

    def _generate(self, llm: LlamaContext, request: GenerationRequest) -> GenerationResult:
        started = time.monotonic()
        prepared = self.prepare(request, llm.tokenize, llm.n_ctx)
        usage = prepared.usage
        stopper = Stopper(request)
        result = GenerationResult(usage=usage)
        try:
            pos = self._prefill(llm, prepared.prefix, prepared.suffix, usage, stopper)
        except DecodeAbortedError:
            result.finish_reason = stopper.reason or FinishReason.CANCELLED
            usage.prefill_s = usage.total_s = time.monotonic() - started
            return result
        usage.prefill_s = time.monotonic() - started
        grammar = index = None
        if prepared.grammar is not None:
            grammar = self._grammars.fresh(prepared.grammar)
            if self._first_bytes is None:  # once per model, on the first constrained request
                self._first_bytes = FirstByteIndex(llm.n_vocab, llm.piece, llm.eog_tokens)
            index = self._first_bytes
        with SamplerChain(request.sampling, grammar, llm.n_vocab, llm.eog_tokens,
                          index) as sampler:
            raw, finish = self._decode_loop(llm, sampler, pos, prepared.max_tokens, stopper,
                                            usage, started, request.on_token)
        usage.total_s = time.monotonic() - started
        result.raw_text = raw
        result.finish_reason = finish
        return self.finish(result, prepared)

    def _prefill(self, llm: LlamaContext, prefix: list[int], suffix: list[int], usage: Usage,
                 stopper: Callable[[], bool]) -> int:
        """Bring sequence 0 to the end of the prompt; returns the next position."""
        llm.clear_sequence(WORK_SEQ)
        if not self.config.prefix_cache:
            llm.decode(prefix + suffix, 0, WORK_SEQ, True, stopper)
            return len(prefix) + len(suffix)
        if prefix != self._prefix_tokens:
            self._prefix_tokens = []
            cache = self._state_cache
            if cache is not None and prefix and cache.restore(llm, PREFIX_SEQ, prefix):
                usage.prompt_tokens_reused = len(prefix)
            else:
                llm.clear_sequence(PREFIX_SEQ)
                try:
                    llm.decode(prefix, 0, PREFIX_SEQ, False, stopper)
                except DecodeAbortedError:
                    llm.clear_sequence(PREFIX_SEQ)
                    raise
                if cache is not None and prefix:
                    cache.save(llm, PREFIX_SEQ, prefix)
            self._prefix_tokens = list(prefix)
        else:
            usage.prompt_tokens_reused = len(prefix)
        llm.copy_sequence(PREFIX_SEQ, WORK_SEQ)
        llm.decode(suffix, len(prefix), WORK_SEQ, True, stopper)
        return len(prefix) + len(suffix)

    def _decode_loop(self, llm: LlamaContext, sampler: SamplerChain, pos: int, max_tokens: int,
                     stopper: Stopper, usage: Usage, started: float,
                     on_token: Optional[Callable[[str], None]]) -> tuple[str, FinishReason]:
        stream = TokenStream(usage, started, on_token)
        finish = FinishReason.LENGTH
        for _ in range(max_tokens):
            if stopper():
                finish = stopper.reason
                break
            token = sampler.sample(llm.ctx)
            stream.first_token()
            if llm.is_eog(token):
                finish = FinishReason.STOP
                break
            stream.add_bytes(llm.piece(token))
            if usage.completion_tokens < max_tokens:  # the last token's logits are never used
                llm.decode_one(token, pos, WORK_SEQ)
                pos += 1
        return stream.finish(), finish
