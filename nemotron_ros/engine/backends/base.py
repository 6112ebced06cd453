"""The backend interface every model runtime implements, and what the runtimes share."""

from __future__ import annotations

import abc
import collections
import contextlib
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Optional, TypeVar

from ..grammar import build_grammar
from ..prompt_format import PromptFormat, RenderedPrompt
from ..tool_parser import parse_output, validate_calls
from ..tools import ToolRegistry, ToolSpec
from ..types import (
    CancelToken,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Message,
    ToolChoice,
    Usage,
)

_V = TypeVar('_V')


class BackendError(RuntimeError):
    """A backend could not load or run a model; the message names the model and the cause."""


class RequestError(ValueError):
    """This request cannot be run as given (e.g. its prompt exceeds the context); others can."""


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is, for logs and diagnostics."""

    path: str
    architecture: str
    chat_format: str
    n_ctx: int
    n_vocab: int
    recurrent: bool


@dataclass(frozen=True)
class BackendHealth:
    """How the runtime behind a backend is doing, beyond the scheduler's counts (diagnostics).

    :param ok: False when the runtime cannot serve now (a remote server unreachable).
    :param message: why not, in one line ('' when ok).
    :param values: extra diagnostic key/values (a server's URL and latency).
    """

    ok: bool = True
    message: str = ''
    values: tuple[tuple[str, str], ...] = ()


class Stopper:
    """Deadline and cancel checks shared by prefill and decode; remembers why it fired."""

    def __init__(self, request: GenerationRequest) -> None:
        self.deadline = request.deadline
        self.cancel = request.cancel
        self.reason: Optional[FinishReason] = None

    def __call__(self) -> bool:
        if self.reason is not None:
            return True
        if self.cancel is not None and self.cancel.cancelled:
            self.reason = self.cancel.reason
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = FinishReason.DEADLINE
        return self.reason is not None


@dataclass
class PreparedPrompt:
    """A request turned into tokens: the reusable prefix, the rest, and its grammar."""

    specs: list[ToolSpec]
    rendered: RenderedPrompt
    prefix: list[int]
    suffix: list[int]
    usage: Usage
    max_tokens: int
    grammar: Optional[str]


class ModelGuard:
    """Keeps a loaded model's native memory alive while anything uses it.

    ``generate`` and the token counts run inside :meth:`use` (any number at once, so counting
    on an intake thread never waits for a generation); :meth:`retire` refuses new uses and
    waits until the running ones end. ``unload`` retires the guard before it frees anything,
    so it never frees memory that a prefill chunk or a decode step is still using.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._users = 0
        self._open = False

    def open(self) -> None:
        """Allow uses (after a successful load)."""
        with self._cv:
            self._open = True

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Hold the model for the block; BackendError when it is not loaded or unloading."""
        with self._cv:
            if not self._open:
                raise BackendError('no model is loaded')
            self._users += 1
        try:
            yield
        finally:
            with self._cv:
                self._users -= 1
                self._cv.notify_all()

    def retire(self, timeout: Optional[float] = None) -> bool:
        """Refuse new uses and wait for the running ones; False when ``timeout`` passed first."""
        with self._cv:
            self._open = False
            return self._cv.wait_for(lambda: self._users == 0, timeout)

    @property
    def users(self) -> int:
        with self._cv:
            return self._users


class Memo(Generic[_V]):
    """A small thread-safe LRU map from a key to a value computed on the first miss.

    One request's prompt is rendered and counted several times before it runs (a task's
    ``max_task_tokens`` check, admission at the door, admission again at dispatch, then
    ``generate``): each a few hundred microseconds with a Jinja template. Values are
    computed outside the lock; two threads missing at once both compute, which is harmless.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: collections.OrderedDict[Hashable, _V] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], _V]) -> _V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: _V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


def _messages_key(messages: Sequence[Message]) -> tuple:
    """A hashable key for a conversation (tool call arguments are dicts: keyed by JSON)."""
    return tuple((m.role, m.content,
                  tuple((c.id, c.name, c.arguments_json) for c in m.tool_calls))
                 for m in messages)


class Backend(abc.ABC):
    """One loaded model that answers one generation at a time.

    ``generate`` must honour ``request.deadline`` and ``request.cancel`` (between tokens and
    inside long prefills) and must never return an incomplete or invalid tool call. The
    model-independent steps (render, tokenize, grammar, parse and validate the answer) live
    here so every backend gives the same guarantees.
    """

    def __init__(self, tools: ToolRegistry) -> None:
        self.tools = tools
        self.prompt_format: Optional[PromptFormat] = None
        self._prefix_encoding: tuple[str, list[int]] = ('', [])
        self._renders: Memo[RenderedPrompt] = Memo(8)
        self._counts: Memo[int] = Memo(16)  # by (prompt format, text)

    def render(self, request: GenerationRequest) -> RenderedPrompt:
        """The prompt text of ``request`` in this model's format, tools included."""
        offered = request.tools if request.offered_tools is None else request.offered_tools
        prompt_format, tools = self.prompt_format, self.tools
        key = (prompt_format, tools, tuple(offered), request.enable_thinking,
               _messages_key(request.messages))
        return self._renders.get(key, lambda: prompt_format.render(
            request.messages, tools.subset(offered), thinking=request.enable_thinking))

    def _count_text(self, text: str) -> int:
        """:meth:`count_tokens`, remembered for the few texts counted again and again."""
        # Keyed by the prompt format too: each load makes a new one, so a reloaded model
        # never sees counts from another tokenizer.
        return self._counts.get((self.prompt_format, text), lambda: self.count_tokens(text))

    def prepare(self, request: GenerationRequest, encode: Callable[[str], list[int]],
                n_ctx: int) -> PreparedPrompt:
        """Render and tokenize ``request``; RequestError when it cannot fit the context."""
        specs = self.tools.subset(request.tools)
        rendered = self.render(request)
        prefix = self._encode_prefix(rendered.prefix, encode)
        suffix_text = rendered.text[len(rendered.prefix):]
        suffix = encode(suffix_text)
        self._counts.put((self.prompt_format, suffix_text), len(suffix))
        usage = Usage(prompt_tokens=len(prefix) + len(suffix))
        room = n_ctx - usage.prompt_tokens
        if room < 1:
            raise RequestError(f'prompt has {usage.prompt_tokens} tokens, the context holds '
                               f'{n_ctx}')
        grammar = None
        if request.constrained and (specs or request.tool_choice is not ToolChoice.NONE):
            grammar = build_grammar(specs, request.tool_choice, rendered.reasoning_open,
                                    request.max_tool_calls)
        return PreparedPrompt(specs=specs, rendered=rendered, prefix=prefix, suffix=suffix,
                              usage=usage, max_tokens=min(request.sampling.max_tokens, room),
                              grammar=grammar)

    def _encode_prefix(self, text: str, encode: Callable[[str], list[int]]) -> list[int]:
        """Tokens of the fixed prefix, re-tokenized only when its text changes (~4 ms at 4k)."""
        cached_text, tokens = self._prefix_encoding
        if text != cached_text or not text:
            tokens = encode(text)
            self._prefix_encoding = (text, tokens)
        return list(tokens)

    def finish(self, result: GenerationResult, prepared: PreparedPrompt) -> GenerationResult:
        """Split the raw text into reasoning, reply and validated calls (complete output only)."""
        parsed = parse_output(result.raw_text, prepared.specs,
                              thinking=prepared.rendered.reasoning_open)
        result.reasoning = parsed.reasoning
        result.text = parsed.content
        if result.complete:
            result.tool_calls, result.rejected = validate_calls(
                parsed, self.tools, allowed={s.name for s in prepared.specs})
        elif parsed.calls or parsed.errors:
            result.rejected = [f'generation ended by {result.finish_reason.value}: '
                               'incomplete tool calls dropped']
        return result

    @abc.abstractmethod
    def load(self, cancel: Optional[CancelToken] = None) -> ModelInfo:
        """Load the model; raises BackendError with the path and the reason on failure.

        :param cancel: aborts the load (BackendError) where the runtime can be interrupted:
            llama.cpp checks it while reading tensors; torch between loading steps.
        """

    @abc.abstractmethod
    def unload(self) -> None:
        """Free the model. Idempotent."""

    @property
    @abc.abstractmethod
    def loaded(self) -> bool:
        """True between a successful load() and unload()."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one generation to completion, the deadline, a cancel or max_tokens."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` encodes to."""

    def count_new_tokens(self, request: GenerationRequest, runs_next: bool = True) -> int:
        """Tokens ``generate(request)`` would evaluate if it ran now (admission control).

        Renders the prompt as ``generate`` does and counts the part after the fixed prefix;
        the prefix counts too when it would be evaluated: prefix reuse off, or a prefix other
        than the one whose model state is kept (:meth:`reuses_prefix`). This is the figure the
        backend reports as ``prompt_tokens - prompt_tokens_reused``. A backend without a prompt
        format (a test stand-in) counts the message texts.

        :param runs_next: nothing else will run before it, so a backend that continues the
            state the last generation left (the llama.cpp backend) may count that reuse too;
            False counts from the fixed prefix.
        """
        if self.prompt_format is None:
            return self.count_tokens('\n'.join(m.content for m in request.messages))
        return self._count_new(request, self.render(request), runs_next)

    def _count_new(self, request: GenerationRequest, rendered: RenderedPrompt,
                   runs_next: bool) -> int:
        """:meth:`count_new_tokens` of a rendered prompt; backends that reuse more override it."""
        new = self._count_text(rendered.text[len(rendered.prefix):])
        if self.reuses_prefix(rendered.prefix):
            return new
        return new + self.count_tokens(rendered.prefix)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens of the whole rendered prompt of ``request``, reused prefix included.

        The fixed prefix's count comes from the tokenization ``generate`` keeps (a 4k-token
        prefix costs milliseconds to tokenize again), so only the request's own part is
        tokenized here: a multi-step task checks ``max_task_tokens`` before every step.
        """
        if self.prompt_format is None:
            return self.count_tokens('\n'.join(m.content for m in request.messages))
        rendered = self.render(request)
        cached_text, tokens = self._prefix_encoding
        prefix = len(tokens) if rendered.prefix and rendered.prefix == cached_text else \
            self.count_tokens(rendered.prefix)
        return prefix + self._count_text(rendered.text[len(rendered.prefix):])

    def reuses_prefix(self, prefix: str) -> bool:
        """True when a generation whose prompt starts with ``prefix`` skips evaluating it."""
        return False

    def health(self) -> BackendHealth:
        """The runtime's health for diagnostics; never blocks (a timer calls it)."""
        return BackendHealth()

