"""Model runtimes behind one interface, one subpackage per runtime, and the factory.

The factory imports a runtime only inside its own branch, so llama.cpp users never load
torch and the other way round, and only remote users load httpx. The interface lives in
``base``, which imports no runtime, so the runtimes can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..settings import BACKENDS
from ..tools import ToolRegistry
from .base import (
    Backend,
    BackendError,
    BackendHealth,
    ModelGuard,
    ModelInfo,
    RequestError,
    Stopper,
)

__all__ = [
    'Backend', 'BackendError', 'BackendHealth', 'ModelGuard', 'ModelInfo', 'RequestError',
    'Stopper', 'create_backend',
]


def create_backend(kind: str, tools: ToolRegistry, options: Mapping[str, Any]) -> Backend:
    """Build the backend named ``kind`` (one of ``settings.BACKENDS``) with its options."""
    if kind == 'llama_cpp':
        from .llama.backend import LlamaBackend, LlamaConfig
        return LlamaBackend(LlamaConfig(**options), tools)
    if kind == 'torch':
        from .torch.backend import TorchBackend, TorchConfig
        return TorchBackend(TorchConfig(**options), tools)
    if kind == 'remote':
        from .remote.backend import RemoteBackend, RemoteConfig
        return RemoteBackend(RemoteConfig(**options), tools)
    raise ValueError(f'backend must be one of {", ".join(BACKENDS)}; got {kind!r}')
