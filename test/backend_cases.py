"""What the runtime backends' tests share: the example tools, the chat they send, and the
check that a constrained answer keeps the contract (used by the llama.cpp, torch and remote
backend tests alike, so each runtime is held to the same promise)."""

from __future__ import annotations

import random
from pathlib import Path

from nemotron_ros.engine.backends import Backend
from nemotron_ros.engine.tools import ToolRegistry
from nemotron_ros.engine.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Message,
    SamplingParams,
    ToolCall,
    ToolChoice,
)

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ToolRegistry.from_yaml(ROOT / 'config' / 'tools.example.yaml')
SYSTEM = 'You are the language interface of a mobile robot.'


def chat(text: str) -> list[Message]:
    """The system prompt and one user turn."""
    return [Message('system', SYSTEM), Message('user', text)]


def checked_calls(result: GenerationResult, allowed: list[str], choice: ToolChoice,
                  malformed: tuple[str, ...] = ('block', 'parse')) -> list[ToolCall]:
    """The calls of one constrained answer, after asserting what the contract promises.

    :param malformed: rejection reasons that mean the grammar let a malformed call through.
    """
    # A random-weight model sampled at temperature 1 may end its answer or run into
    # max_tokens: both are legitimate ends; a truncated one must return no call.
    assert result.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), result.error
    if result.finish_reason is FinishReason.LENGTH:
        assert result.tool_calls == [], 'a truncated call must never be returned'
        return []
    assert not [r for r in result.rejected if any(m in r for m in malformed)], result.rejected
    if choice is ToolChoice.REQUIRED:
        assert result.tool_calls or result.rejected, result.raw_text
    for call in result.tool_calls:
        assert call.name in allowed
        assert TOOLS.validate_call(call.name, call.arguments) == []
    return result.tool_calls


def assert_constrained_calls_valid_over_200_seeds(backend: Backend) -> None:
    """200 sampled answers over random tool subsets: every returned call parses and
    validates, none is ever truncated, and enough calls of enough tools come back."""
    rng = random.Random(1234)
    names = list(TOOLS.names)
    returned = 0
    called: set[str] = set()
    for seed in range(200):
        allowed = rng.sample(names, rng.randint(1, len(names)))
        choice = ToolChoice.REQUIRED if seed % 2 else ToolChoice.AUTO
        calls = checked_calls(backend.generate(GenerationRequest(
            messages=chat('Bring the red cup to the table.'), tools=allowed,
            tool_choice=choice, sampling=SamplingParams(temperature=1.0, seed=seed,
                                                        max_tokens=160))), allowed, choice)
        called.update(call.name for call in calls)
        returned += len(calls)
    assert returned >= 50, f'only {returned} valid calls in 200 generations'
    assert len(called) >= 5, f'too few distinct tools exercised: {called}'
