"""The llama.cpp backend: GGUF models, grammar-constrained tool calls, deadlines, prefix reuse.

Hybrid Mamba/attention models such as Nemotron 3 cannot have their recurrent state partially
rolled back, so llama.cpp's own prompt caches re-process the whole prompt on every request.
This backend keeps the state after the fixed prefix (system prompt + tools) in sequence 1 of a
two-sequence context and copies it into sequence 0 for each request (``llama_memory_seq_cp``,
well under a millisecond), so time to first token depends on the new tokens only.

Sequence 0 still holds the last generation (its prompt and the tokens decoded after it) when
the next request arrives. When that request continues the same conversation (its messages
start with every message of the last one: a task's next step), it continues sequence 0
instead: a transformer keeps the longest common start of the tokens (the rest is dropped), a
recurrent or hybrid model only the whole of it (when the answer it generated is token for
token the turn the next prompt renders). Only the new turns are then evaluated. Any other
request starts from the fixed prefix's state, so its answer never depends on what ran before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from ... import settings
from ...prompt_format import RenderedPrompt, select_prompt_format, vocab_markers
from ...tools import ToolRegistry
from ...types import (
    CancelToken,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Message,
    Usage,
)
from ..base import Backend, BackendError, Memo, ModelGuard, ModelInfo, Stopper
from ..decoding import TokenStream
from .context import ContextOptions, DecodeAbortedError, LlamaContext, LlamaLoadError
from .sampler import FirstByteIndex, GrammarCache, SamplerChain
from .state_cache import PrefixStateCache

PREFIX_SEQ = 1
WORK_SEQ = 0


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many first tokens the lists ``a`` and ``b`` share (slice compares in C, halving
    the range: thousands of tokens per request)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


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
        self._work_tokens: list[int] = []  # what WORK_SEQ holds; [] = unknown
        self._work_prefix = ''  # the fixed prefix's text it starts with
        self._work_messages: tuple[Message, ...] = ()  # the conversation it holds
        self._can_trim = False  # the loaded model's sequences can drop their last positions
        self._token_memo: Memo[tuple[int, ...]] = Memo(16)  # by (prompt format, text)
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
        self._work_tokens, self._work_messages = [], ()
        self._can_trim = llm.can_trim
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
        self._work_tokens, self._work_messages = [], ()

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def count_tokens(self, text: str) -> int:
        with self._guard.use():
            return len(self._require().tokenize(text))

    def _tokens(self, text: str, llm: Optional[LlamaContext] = None) -> tuple[int, ...]:
        """The tokens of a prompt's text, remembered: a step's prompt is counted at the door,
        again at dispatch, then evaluated. Keyed by the prompt format too (each load makes a
        new one). ``llm``: the context the caller already holds the guard for."""
        def tokenize() -> tuple[int, ...]:
            if llm is not None:
                return tuple(llm.tokenize(text))
            with self._guard.use():
                return tuple(self._require().tokenize(text))

        return self._token_memo.get((self.prompt_format, text), tokenize)

    def _count_text(self, text: str) -> int:
        return len(self._tokens(text))

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
        prepared = self.prepare(request, lambda text: list(self._tokens(text, llm)), llm.n_ctx)
        usage = prepared.usage
        stopper = Stopper(request)
        result = GenerationResult(usage=usage)
        try:
            pos = self._prefill(llm, prepared.prefix, prepared.suffix, usage, stopper,
                                self._continues(request, prepared.rendered.prefix))
            self._work_prefix = prepared.rendered.prefix
            self._work_messages = tuple(request.messages)
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

    def _continues(self, request: GenerationRequest, prefix_text: str) -> bool:
        """Whether ``request`` (its fixed prefix rendered as ``prefix_text``) continues the
        conversation sequence 0 holds: the same prefix, every message of it, then more (a
        task's next step)."""
        held = self._work_messages
        messages = request.messages
        return (prefix_text == self._work_prefix and 0 < len(held) < len(messages)
                and tuple(messages[:len(held)]) == held)

    def _prefill(self, llm: LlamaContext, prefix: list[int], suffix: list[int], usage: Usage,
                 stopper: Callable[[], bool], continues: bool = False) -> int:
        """Bring sequence 0 to the end of the prompt; returns the next position.

        :param continues: the request continues the conversation sequence 0 holds (with the
            same fixed prefix), which may then be kept (see the module docstring).
        """
        prompt = prefix + suffix
        held, self._work_tokens = self._work_tokens, []  # unknown until the prompt is in
        kept = self._reusable(held, len(prefix), suffix) if continues else 0
        if 0 < kept < len(held) and not llm.trim_sequence(WORK_SEQ, kept):
            kept = 0
        if kept:
            usage.prompt_tokens_reused = kept
            llm.decode(prompt[kept:], kept, WORK_SEQ, True, stopper)
        else:
            llm.clear_sequence(WORK_SEQ)
            self._start_from_prefix(llm, prefix, suffix, usage, stopper)
        self._work_tokens = prompt
        return len(prompt)

    def _reusable(self, held: list[int], fixed: int, suffix: Sequence[int]) -> int:
        """How many of the prompt's first tokens sequence 0 (holding ``held``, which starts
        with the same ``fixed`` prefix tokens) can keep for it; 0 = none beyond the fixed
        prefix (start from its state). At least the last prompt token is always evaluated:
        its logits give the first answer token."""
        if not (self.config.prefix_cache and len(held) > fixed):
            return 0
        if self._can_trim:
            common = fixed + common_prefix_length(held[fixed:], list(suffix))
        else:  # a recurrent state is kept whole or not at all
            whole = tuple(held[fixed:]) == tuple(suffix[:len(held) - fixed])
            common = len(held) if whole else 0
        common = min(common, fixed + len(suffix) - 1)
        if common <= fixed or (common < len(held) and not self._can_trim):
            return 0
        return common

    def _count_new(self, request: GenerationRequest, rendered: RenderedPrompt,
                   runs_next: bool) -> int:
        """With ``runs_next``, a request that continues what sequence 0 holds (a task's next
        step) counts only the tokens after that (see :meth:`.Backend.count_new_tokens`)."""
        held = self._work_tokens  # [] while a generation runs: it will hold something else
        prefix_text, prefix = self._prefix_encoding  # the token count of that prefix
        if runs_next and held and rendered.prefix == prefix_text and \
                self._continues(request, rendered.prefix):
            suffix = self._tokens(rendered.text[len(rendered.prefix):])
            kept = self._reusable(held, len(prefix), suffix)
            if kept:
                return len(prefix) + len(suffix) - kept
        return super()._count_new(request, rendered, runs_next)

    def _start_from_prefix(self, llm: LlamaContext, prefix: list[int], suffix: list[int],
                           usage: Usage, stopper: Callable[[], bool]) -> None:
        """Sequence 0 (empty) = the fixed prefix's state, then the rest of the prompt."""
        if not self.config.prefix_cache:
            llm.decode(prefix + suffix, 0, WORK_SEQ, True, stopper)
            return
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

    def _decode_loop(self, llm: LlamaContext, sampler: SamplerChain, pos: int, max_tokens: int,
                     stopper: Stopper, usage: Usage, started: float,
                     on_token: Optional[Callable[[str], None]]) -> tuple[str, FinishReason]:
        stream = TokenStream(usage, started, on_token)
        finish = FinishReason.LENGTH
        held, self._work_tokens = self._work_tokens, []  # unknown should a decode fail
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
                held.append(token)
                pos += 1
        self._work_tokens = held
        return stream.finish(), finish
