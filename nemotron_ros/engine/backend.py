"""The backend interface every model runtime implements, and the factory that picks one.

The factory imports a backend only inside its own branch, so llama.cpp users never load
torch and the other way round.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .tools import ToolRegistry
from .types import GenerationRequest, GenerationResult


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


class Backend(abc.ABC):
    """One loaded model that answers one generation at a time.

    ``generate`` must honour ``request.deadline`` and ``request.cancel`` (between tokens and
    inside long prefills) and must never return an incomplete or invalid tool call.
    """

    def __init__(self, tools: ToolRegistry) -> None:
        self.tools = tools

    @abc.abstractmethod
    def load(self) -> ModelInfo:
        """Load the model; raises BackendError with the path and the reason on failure."""

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
        """Number of tokens ``text`` encodes to (used by admission control)."""


def create_backend(kind: str, tools: ToolRegistry, options: Mapping[str, Any]) -> Backend:
    """Build the backend named ``kind`` ('llama_cpp' or 'torch') with its options."""
    if kind == 'llama_cpp':
        from .llama_backend import LlamaBackend, LlamaConfig
        return LlamaBackend(LlamaConfig(**options), tools)
    if kind == 'torch':
        from .torch_backend import TorchBackend, TorchConfig
        return TorchBackend(TorchConfig(**options), tools)
    raise ValueError(f"backend must be one of 'llama_cpp', 'torch'; got {kind!r}")
