"""Plain data passed between the engine's parts: requests, results, sampling and cancel tokens.

Kept free of any backend or ROS import so that the scheduler, the node and the tests can
share them without loading llama.cpp or torch.
"""

from __future__ import annotations

import enum
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from . import settings


class FinishReason(str, enum.Enum):
    """Why a generation ended.

    Only ``STOP`` means the output is complete; every other reason means it was cut, and
    a cut tool call is never returned as a tool call.
    """

    STOP = 'stop'
    LENGTH = 'length'
    DEADLINE = 'deadline'
    CANCELLED = 'cancelled'
    ERROR = 'error'


class ToolChoice(str, enum.Enum):
    """What the constrained answer may contain."""

    AUTO = 'auto'
    REQUIRED = 'required'
    NONE = 'none'


@dataclass(frozen=True)
class ToolCall:
    """One validated call of an allowed tool."""

    id: str
    name: str
    arguments: dict

    @property
    def arguments_json(self) -> str:
        """Arguments serialized as compact JSON (what goes on the wire)."""
        return json.dumps(self.arguments, separators=(',', ':'), ensure_ascii=False,
                          allow_nan=False)


@dataclass(frozen=True)
class Message:
    """One chat turn. ``role`` is system, user, assistant or tool."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ('system', 'user', 'assistant', 'tool'):
            raise ValueError(
                f"message role must be one of system, user, assistant, tool; got {self.role!r}")


@dataclass
class SamplingParams:
    """Sampling settings of one request; temperature 0 means greedy.

    The defaults are the engine's neutral ones (greedy, no nucleus cut), for engine users and
    tests; the node's defaults come from its parameters (``EngineConfig.sampling``). The
    limits of the settings the node exposes are those of :mod:`.settings`.
    ``ignore_eos`` keeps generating past end-of-turn (benchmarks and tests of long runs); it
    applies to unconstrained generation only, since a finished grammar allows nothing else.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int = 0
    max_tokens: int = 256
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name in ('temperature', 'top_p', 'top_k', 'seed', 'max_tokens'):
            settings.check(name, getattr(self, name))
        # Not node parameters: only engine users set these.
        if not (0.0 <= self.min_p < 1.0):
            raise ValueError(f'min_p must be in [0, 1), got {self.min_p}')
        if not self.repeat_penalty > 0.0:
            raise ValueError(f'repeat_penalty must be > 0, got {self.repeat_penalty}')


class CancelToken:
    """Thread-safe cancellation flag checked by the backend between tokens and prefill chunks."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._reason = FinishReason.CANCELLED

    def cancel(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """Ask the generation to stop; ``reason`` becomes its finish reason."""
        if not self._event.is_set():
            self._reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> FinishReason:
        return self._reason


TokenCallback = Callable[[str], None]


@dataclass
class GenerationRequest:
    """Everything one generation needs.

    :param messages: the conversation, system turn included (the backend adds the tools).
    :param tools: names of the tools the model may call; empty means no tools at all.
    :param offered_tools: tools described in the prompt; None = ``tools``. Offering every
        configured tool while ``tools`` narrows what the grammar admits keeps the prompt
        prefix identical across requests, so its model state can be reused.
    :param max_tool_calls: most calls in one answer (1 to 8) when constrained.
    :param deadline: absolute ``time.monotonic()`` seconds; None means no deadline.
    :param on_token: called with each piece of decoded text as it is generated.
    """

    messages: Sequence[Message]
    tools: Sequence[str] = ()
    offered_tools: Optional[Sequence[str]] = None
    tool_choice: ToolChoice = ToolChoice.AUTO
    max_tool_calls: int = 8
    constrained: bool = True
    enable_thinking: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    deadline: Optional[float] = None
    cancel: Optional[CancelToken] = None
    on_token: Optional[TokenCallback] = None


@dataclass
class Usage:
    """Token counts and timings of one generation (seconds)."""

    prompt_tokens: int = 0
    prompt_tokens_reused: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode rate after the first token (0 when fewer than two tokens were generated)."""
        if self.completion_tokens < 2 or self.decode_s <= 0.0:
            return 0.0
        return (self.completion_tokens - 1) / self.decode_s


@dataclass
class GenerationResult:
    """The outcome of one generation.

    ``tool_calls`` holds only complete calls that passed schema and limit checks;
    ``rejected`` says why any other call the model produced was dropped.
    """

    text: str = ''
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str = ''
    finish_reason: FinishReason = FinishReason.STOP
    usage: Usage = field(default_factory=Usage)
    raw_text: str = ''
    rejected: list[str] = field(default_factory=list)
    error: str = ''

    @property
    def complete(self) -> bool:
        return self.finish_reason is FinishReason.STOP


def is_finite_json(value: object) -> bool:
    """True when every number inside a decoded JSON value is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(is_finite_json(v) for v in value.values())
    if isinstance(value, list):
        return all(is_finite_json(v) for v in value)
    return True
