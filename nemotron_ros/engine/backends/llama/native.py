"""The llama.cpp backend's C helpers (``src/*.c``, built by colcon), bound with ctypes.

Two hot paths must not re-enter Python: llama.cpp polls its abort callback once per graph node
(a ctypes callback takes the GIL each time, so any busy Python thread slowed prefill down),
and a grammar-masked draw is a few grammar calls wrapped in numpy and ctypes glue that cost
more than the grammar itself. The library holds both. It is found in ``<prefix>/lib`` of the
ament prefixes; without it (a source tree not built with colcon) the backend falls back to
Python equivalents and says so once.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Optional

import llama_cpp
import numpy as np

_LOG = logging.getLogger(__name__)
LIBRARY = 'libnemotron_ros_native.so'
_INT32_P = ctypes.POINTER(ctypes.c_int32)


class FirstByteTables(ctypes.Structure):
    """``nr_first_byte_index`` in src/grammar_mask.c: FirstByteIndex's compressed rows."""

    _fields_ = [
        ('probe_tokens', _INT32_P), ('probe_bytes', _INT32_P), ('n_probes', ctypes.c_int32),
        ('always', _INT32_P), ('n_always', ctypes.c_int32),
        ('by_byte_start', _INT32_P), ('by_byte', _INT32_P),
        ('loose_start', _INT32_P), ('loose', _INT32_P),
        ('pair_start', _INT32_P), ('pair_probes', _INT32_P),
        ('member_start', _INT32_P), ('members', _INT32_P),
    ]


def int32_pointer(array: np.ndarray) -> ctypes._Pointer:
    """A C pointer to a contiguous int32 array (the caller keeps the array alive)."""
    if array.dtype != np.int32 or not array.flags.c_contiguous:
        raise ValueError('expected a contiguous int32 array')
    return array.ctypes.data_as(_INT32_P)


def _find() -> Optional[Path]:
    prefixes = [Path(p) for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p]
    prefixes += list(Path(__file__).parents)  # the install tree, when not symlinked
    for prefix in prefixes:
        candidate = prefix / 'lib' / LIBRARY
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def library() -> Optional[ctypes.CDLL]:
    """The loaded library with its functions typed, or None (logged once)."""
    path = _find()
    if path is None:
        _LOG.warning('%s not found (build the package with colcon): prefill aborts and '
                     'grammar-masked draws use slower Python code', LIBRARY)
        return None
    try:
        lib = ctypes.CDLL(str(path))
        lib.nemotron_ros_abort_requested.restype = ctypes.c_bool
        lib.nemotron_ros_abort_requested.argtypes = [ctypes.c_void_p]
        lib.nemotron_ros_grammar_candidates.restype = ctypes.c_int32
        lib.nemotron_ros_grammar_candidates.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(FirstByteTables), ctypes.c_int32,
            ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
        lib.nemotron_ros_masked_draw.restype = ctypes.c_int32
        lib.nemotron_ros_masked_draw.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(FirstByteTables),
            ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_float), ctypes.c_int32,
            ctypes.c_void_p, ctypes.c_void_p]
    except (OSError, AttributeError) as exc:
        _LOG.warning('cannot load %s (%s): prefill aborts and grammar-masked draws use slower '
                     'Python code', path, exc)
        return None
    return lib


def abort_callback() -> Optional[llama_cpp.ggml_abort_callback]:
    """The C abort callback as a ggml callback pointer, or None without the library."""
    lib = library()
    if lib is None:
        return None
    function = ctypes.cast(lib.nemotron_ros_abort_requested, ctypes.c_void_p).value
    return llama_cpp.ggml_abort_callback(function)


def sampler_apply_address() -> int:
    """llama_sampler_apply's address, which the C draw calls for the grammar and the chain."""
    return ctypes.cast(llama_cpp.llama_sampler_apply, ctypes.c_void_p).value
