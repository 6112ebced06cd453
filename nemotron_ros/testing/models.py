"""Find or make the model files tests and benchmarks run on.

SmolLM2-135M-Instruct, the node's default model, is located by the engine itself
(:mod:`nemotron_ros.engine.packaged_models`); it is re-exported here for the tests.

Tiny ``nemotron_h`` models are cheap but not free to build, so ``tiny_nemotron_h_path`` keeps one
file per distinct argument set in a directory (e.g. a session-scoped pytest tmp dir).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from nemotron_ros.engine.packaged_models import SMOLLM2_FILENAME, smollm2_gguf_path
from nemotron_ros.testing.tiny_gguf import build_tiny_nemotron_h

__all__ = ['SMOLLM2_FILENAME', 'smollm2_gguf_path', 'tiny_nemotron_h_path']


def tiny_nemotron_h_path(directory: str | os.PathLike[str], **kwargs: object) -> Path:
    """A tiny ``nemotron_h`` GGUF in ``directory`` for these ``build_tiny_nemotron_h`` kwargs.

    Built on first use and reused afterwards; the file name holds a hash of the arguments, so
    different variants can share a directory.
    """
    key = json.dumps(kwargs, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = Path(directory) / f'tiny-nemotron-h-{digest}.gguf'
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_nemotron_h(path, **kwargs)
    return path


def model_by_name(name: str, scratch: str | os.PathLike[str]) -> str:
    """A model path from a benchmark's ``--model`` value.

    ``tiny_nemotron_h`` builds the tiny GGUF in ``scratch``, ``smollm2`` is the packaged
    SmolLM2; anything else is taken as a GGUF path.
    """
    if name == 'tiny_nemotron_h':
        return str(tiny_nemotron_h_path(scratch))
    if name == 'smollm2':
        return str(smollm2_gguf_path())
    return name
