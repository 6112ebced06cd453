"""A thin, owned wrapper over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

The high-level ``llama_cpp.Llama`` re-processes the whole prompt of hybrid models on every
call and adds per-token Python machinery; this wrapper exposes just what the backend needs:
tokenize, detokenize, batched decode on a chosen sequence, sequence copy/remove for prefix
reuse, an abort hook for long prefills, and metadata. Native handles are released by an
``ExitStack``; ``close()`` is idempotent.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import llama_cpp
from llama_cpp import _logger as llama_logger

from . import native as native_helpers

_LOG = logging.getLogger(__name__)
_NULL_ABORT = llama_cpp.ggml_abort_callback(0)
# How often the prefill watchdog asks ``should_stop`` (it holds the GIL only for the check).
WATCHDOG_POLL_S = 0.002
_FLASH_ATTN = {'auto': -1, 'off': 0, 'on': 1}
# Token kinds llama_tokenize matches in plain text: control and unknown tokens when it parses
# special tokens (the prompt needs that), user-defined ones always.
_PARSED_SPECIAL = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
_USER_DEFINED = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED


class LlamaLoadError(RuntimeError):
    """The model file could not be loaded; the message names the file and the cause."""


class DecodeAbortedError(RuntimeError):
    """llama_decode stopped early because the abort hook asked it to."""


@dataclass(frozen=True)
class ContextOptions:
    """Native context settings (see LlamaConfig for their meaning)."""

    n_ctx: int
    n_batch: int
    n_threads: int
    n_threads_batch: int
    n_gpu_layers: int
    n_seq_max: int
    flash_attn: str
    use_mmap: bool
    verbose: bool = False


def _check_gguf_header(path: str) -> None:
    if not os.path.exists(path):
        raise LlamaLoadError(f'model file not found: {path}')
    if not os.path.isfile(path):
        raise LlamaLoadError(f'model path is not a file: {path}')
    with open(path, 'rb') as handle:
        magic = handle.read(4)
    if magic != b'GGUF':
        raise LlamaLoadError(f'not a GGUF file (bad magic {magic!r}): {path}')


class LlamaContext:
    """One llama.cpp model and context, used from one thread at a time.

    Prefill aborts are GIL-free where our C callback is installed: llama.cpp polls it per
    graph node, it reads :attr:`_abort_flag`, and a watchdog thread sets that byte when
    ``should_stop`` turns true. Without the library, a ctypes callback polls ``should_stop``.
    """

    def __init__(self, model_path: str, options: ContextOptions,
                 aborted: Optional[Callable[[], bool]] = None) -> None:
        """Load the model and create its context.

        :param aborted: polled while llama.cpp reads the tensors; True stops the load
            (LlamaLoadError), so a shutdown need not wait for a multi-GB model to load.
        """
        _check_gguf_header(model_path)
        self.path = model_path
        self.options = options
        self._stack = contextlib.ExitStack()
        self._abort_check: Optional[Callable[[], bool]] = None
        self._abort_flag = ctypes.c_ubyte(0)
        native = native_helpers.abort_callback()
        self.native_abort = native is not None
        self._abort_cb = native or llama_cpp.ggml_abort_callback(self._on_abort_poll)
        llama_logger.set_verbose(options.verbose)
        llama_cpp.llama_backend_init()
        try:
            self._load(options, aborted)
        except BaseException:
            self._stack.close()
            raise
        n_batch = options.n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, options.n_seq_max)
        self._stack.callback(llama_cpp.llama_batch_free, self._batch)
        self._piece_buf = ctypes.create_string_buffer(256)

    def _load(self, options: ContextOptions, aborted: Optional[Callable[[], bool]]) -> None:
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = options.n_gpu_layers
        mparams.use_mmap = options.use_mmap
        if aborted is not None:
            # Kept on self: ctypes must not free the trampoline while llama.cpp may call it.
            self._progress_cb = llama_cpp.llama_progress_callback(
                lambda _progress, _data: not aborted())
            mparams.progress_callback = self._progress_cb
        model = llama_cpp.llama_model_load_from_file(self.path.encode(), mparams)
        if not model and aborted is not None and aborted():
            raise LlamaLoadError(f'loading {self.path} was aborted')
        if not model:
            raise LlamaLoadError(
                f'llama.cpp could not load {self.path}: corrupt file, unsupported architecture '
                'or quantization (set verbose:=true for llama.cpp\'s own log)')
        self.model = model
        self._stack.callback(llama_cpp.llama_model_free, model)
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = options.n_ctx
        cparams.n_batch = options.n_batch
        cparams.n_ubatch = options.n_batch
        cparams.n_seq_max = options.n_seq_max
        cparams.n_threads = options.n_threads
        cparams.n_threads_batch = options.n_threads_batch
        cparams.flash_attn_type = _FLASH_ATTN[options.flash_attn]
        cparams.kv_unified = True
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise LlamaLoadError(
                f'llama.cpp could not create a context for {self.path} '
                f'(n_ctx={options.n_ctx}: out of memory?)')
        self.ctx = ctx
        self._stack.callback(llama_cpp.llama_free, ctx)
        if self.native_abort:  # reads our flag byte, which stays 0 outside a watched prefill
            llama_cpp.llama_set_abort_callback(ctx, self._abort_cb,
                                               ctypes.cast(ctypes.byref(self._abort_flag),
                                                           ctypes.c_void_p))
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.eog_tokens = tuple(t for t in range(self.n_vocab)
                                if llama_cpp.llama_vocab_is_eog(self.vocab, t))

    def close(self) -> None:
        """Free the context and the model. Safe to call more than once."""
        self._stack.close()

    # -- metadata -------------------------------------------------------------------------
    def metadata(self, key: str) -> Optional[str]:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode('utf-8', errors='replace')

    def chat_template(self) -> Optional[str]:
        raw = llama_cpp.llama_model_chat_template(self.model, None)
        return raw.decode('utf-8', errors='replace') if raw else None

    @property
    def recurrent(self) -> bool:
        """True for recurrent and hybrid models, whose state cannot be partially rolled back."""
        return bool(llama_cpp.llama_model_is_recurrent(self.model)
                    or llama_cpp.llama_model_is_hybrid(self.model))

    @property
    def bos(self) -> int:
        return llama_cpp.llama_vocab_bos(self.vocab)

    @property
    def eos(self) -> int:
        return llama_cpp.llama_vocab_eos(self.vocab)

    def token_text(self, token: int) -> str:
        """Text of a token ('' for none, i.e. -1)."""
        if token < 0:
            return ''
        return self.piece(token).decode('utf-8', errors='replace')

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # -- text -----------------------------------------------------------------------------
    def special_token_texts(self) -> tuple[list[str], list[str]]:
        """(control and unknown token texts, user-defined token texts).

        :meth:`tokenize` turns these texts into their tokens wherever they appear: the first
        kind because it parses special tokens (the prompt's own markers need that), the second
        always. A prompt format defangs them in untrusted text (see ``vocab_markers``).
        """
        control: list[str] = []
        user_defined: list[str] = []
        for token in range(self.n_vocab):
            attr = llama_cpp.llama_vocab_get_attr(self.vocab, token)
            if attr & _PARSED_SPECIAL:
                control.append(self.token_text(token))
            elif attr & _USER_DEFINED:
                user_defined.append(self.token_text(token))
        return control, user_defined

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        data = text.encode('utf-8')
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special,
                                     True)
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity,
                                         add_special, True)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """Bytes of one token, special tokens rendered as their text."""
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf,
                                           len(self._piece_buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    # -- state ----------------------------------------------------------------------------
    def clear_sequence(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def copy_sequence(self, src: int, dst: int) -> None:
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    @property
    def can_trim(self) -> bool:
        """Whether a sequence can drop its last positions and keep the rest: not for
        recurrent and hybrid state (no rollback), nor for a sliding-window cache (it has
        already dropped positions the kept part would need)."""
        return not self.recurrent and llama_cpp.llama_model_n_swa(self.model) == 0

    def trim_sequence(self, seq: int, keep: int) -> bool:
        """Drop ``seq``'s positions from ``keep`` on and keep the first ``keep``; False
        where the memory cannot (:attr:`can_trim`), and ``seq`` must then be cleared."""
        if not self.can_trim:
            return False
        if not llama_cpp.llama_memory_seq_rm(self.memory, seq, keep, -1):
            return False
        return llama_cpp.llama_memory_seq_pos_max(self.memory, seq) == keep - 1

    def save_sequence(self, path: str, seq: int, tokens: Sequence[int]) -> bool:
        """Write ``seq``'s state, and the ``tokens`` it holds, to ``path``; False on failure."""
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        return llama_cpp.llama_state_seq_save_file(self.ctx, path.encode(), seq, array,
                                                   len(tokens)) > 0

    def load_sequence(self, path: str, seq: int, capacity: int) -> Optional[list[int]]:
        """Read a state written by :meth:`save_sequence` into ``seq``; its tokens, or None."""
        self.clear_sequence(seq)
        array = (llama_cpp.llama_token * max(1, capacity))()
        count = ctypes.c_size_t(0)
        read = llama_cpp.llama_state_seq_load_file(self.ctx, path.encode(), seq, array,
                                                   capacity, ctypes.byref(count))
        if read == 0:
            self.clear_sequence(seq)
            return None
        return list(array[:count.value])

    # -- evaluation -----------------------------------------------------------------------
    def _on_abort_poll(self, _data: ctypes.c_void_p) -> bool:
        check = self._abort_check
        return bool(check is not None and check())

    def decode(self, tokens: Sequence[int], start_pos: int, seq: int, want_logits: bool,
               should_stop: Optional[Callable[[], bool]] = None) -> None:
        """Evaluate ``tokens`` on ``seq`` from ``start_pos`` in chunks of n_batch.

        ``should_stop`` is checked between chunks and, on CPU, inside each chunk through
        llama.cpp's abort callback (see the class docstring); when it fires,
        DecodeAbortedError is raised and the sequence holds a partial state that the caller
        must clear.
        """
        n_batch = self.options.n_batch
        total = len(tokens)
        with self._watch(should_stop):
            for begin in range(0, total, n_batch):
                if should_stop is not None and should_stop():
                    raise DecodeAbortedError()
                chunk = tokens[begin:begin + n_batch]
                last_chunk = begin + n_batch >= total
                self._fill_batch(chunk, start_pos + begin, seq, want_logits and last_chunk)
                self._run(should_stop)

    @contextlib.contextmanager
    def _watch(self, should_stop: Optional[Callable[[], bool]]) -> Iterator[None]:
        """Set the abort flag from a watchdog thread once ``should_stop`` is true."""
        if should_stop is None or not self.native_abort:
            yield
            return
        flag = self._abort_flag
        flag.value = 0
        done = threading.Event()

        def watch() -> None:
            while not done.wait(WATCHDOG_POLL_S):
                if should_stop():
                    flag.value = 1
                    return

        watchdog = threading.Thread(target=watch, name='llama-abort-watchdog', daemon=True)
        watchdog.start()
        try:
            yield
        finally:
            done.set()
            watchdog.join()
            flag.value = 0

    def _fill_batch(self, chunk: Sequence[int], pos: int, seq: int, logits_last: bool) -> None:
        batch = self._batch
        n = len(chunk)
        batch.n_tokens = n
        for i, token in enumerate(chunk):
            batch.token[i] = token
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 0
        if logits_last:
            batch.logits[n - 1] = 1

    def _run(self, should_stop: Optional[Callable[[], bool]]) -> None:
        python_hook = should_stop is not None and not self.native_abort
        if python_hook:
            self._abort_check = should_stop
            llama_cpp.llama_set_abort_callback(self.ctx, self._abort_cb, None)
        try:
            rc = llama_cpp.llama_decode(self.ctx, self._batch)
        finally:
            if python_hook:
                llama_cpp.llama_set_abort_callback(self.ctx, _NULL_ABORT, None)
                self._abort_check = None
        if rc == 2 or (rc != 0 and should_stop is not None and should_stop()):
            raise DecodeAbortedError()
        if rc != 0:
            raise RuntimeError(f'llama_decode failed with code {rc} on {self.path}')

    def decode_one(self, token: int, pos: int, seq: int) -> None:
        """Evaluate one generated token (no abort hook: one step is short)."""
        batch = self._batch
        batch.n_tokens = 1
        batch.token[0] = token
        batch.pos[0] = pos
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = seq
        batch.logits[0] = 1
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f'llama_decode failed with code {rc} on {self.path}')
