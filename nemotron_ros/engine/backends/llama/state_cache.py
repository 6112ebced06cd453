"""The model state after the fixed prefix, kept on disk so a restart need not evaluate it again.

Evaluating the system prompt and tools is most of what configure costs (seconds on a robot's
CPU). The state of that one sequence is saved with ``llama_state_seq_save_file`` (which holds
recurrent Mamba state as well as attention KV) under a name derived from everything that shapes
it: the model file (path, size, modification time), llama-cpp-python's version, the context
options and the prefix tokens. A JSON sidecar repeats that key and the file's SHA-256, so a
truncated, corrupt or foreign file is detected before llama.cpp reads it; it is then logged,
removed and ignored, and the prefix is evaluated as if there were no cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import llama_cpp

from .context import LlamaContext

_LOG = logging.getLogger(__name__)
FORMAT = 1
KEEP_FILES = 8
"""State files kept per directory (the most recently used); older ones are deleted."""


class PrefixStateCache:
    """Save and restore one sequence's state per (model, context options, prefix tokens)."""

    def __init__(self, directory: str, llm: LlamaContext) -> None:
        self.directory = Path(os.path.expanduser(directory))
        stat = os.stat(llm.path)
        options = llm.options
        self._model = {
            'format': FORMAT, 'model': os.path.abspath(llm.path), 'size': stat.st_size,
            'mtime_ns': stat.st_mtime_ns, 'llama_cpp': llama_cpp.__version__,
            'n_ctx': llm.n_ctx, 'n_seq_max': options.n_seq_max,
            'flash_attn': options.flash_attn, 'n_gpu_layers': options.n_gpu_layers,
        }
        self._stem = Path(llm.path).stem

    def _key(self, tokens: Sequence[int]) -> dict:
        digest = hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()
        return {**self._model, 'n_tokens': len(tokens), 'tokens_sha256': digest}

    def _paths(self, key: dict) -> tuple[Path, Path]:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        base = f'{self._stem}-{name}'
        return self.directory / f'{base}.state', self.directory / f'{base}.json'

    def restore(self, llm: LlamaContext, seq: int, tokens: Sequence[int]) -> bool:
        """Load the saved state of ``tokens`` into ``seq``; False (seq cleared) if there is none.

        Never raises for a bad file: it is logged, deleted and treated as a miss.
        """
        key = self._key(tokens)
        state, meta = self._paths(key)
        if not state.is_file() or not meta.is_file():
            return False
        problem = self._verify(key, state, meta)
        if problem is None:
            loaded = llm.load_sequence(str(state), seq, len(tokens))
            if loaded == list(tokens):
                os.utime(state)  # recently used: pruned last
                return True
            llm.clear_sequence(seq)
            problem = 'llama.cpp could not restore it' if loaded is None else 'other tokens'
        _LOG.warning('ignoring the prefix state cache file %s: %s', state, problem)
        for path in (state, meta):
            path.unlink(missing_ok=True)
        return False

    def _verify(self, key: dict, state: Path, meta: Path) -> Optional[str]:
        """What is wrong with the pair of files, or None."""
        try:
            recorded = json.loads(meta.read_text())
        except (OSError, ValueError) as exc:
            return f'unreadable metadata ({exc})'
        if not isinstance(recorded, dict) or recorded.get('key') != key:
            return 'saved for another model, prompt or context'
        try:
            digest = _sha256(state)
        except OSError as exc:
            return f'unreadable ({exc})'
        if digest != recorded.get('sha256'):
            return 'corrupt (checksum mismatch)'
        return None

    def save(self, llm: LlamaContext, seq: int, tokens: Sequence[int]) -> None:
        """Save ``seq``'s state (which holds ``tokens``); failures are logged, not raised."""
        key = self._key(tokens)
        state, meta = self._paths(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self.directory, suffix='.tmp')
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                if not llm.save_sequence(tmp_name, seq, tokens):
                    raise OSError('llama_state_seq_save_file failed')
                record = {'key': key, 'sha256': _sha256(tmp)}
                os.replace(tmp, state)
            finally:
                tmp.unlink(missing_ok=True)
            _write_atomically(meta, json.dumps(record, indent=1))
        except OSError as exc:
            _LOG.warning('cannot save the prefix state to %s: %s', self.directory, exc)
            return
        self._prune()

    def _prune(self) -> None:
        try:
            states = sorted(self.directory.glob('*.state'), key=lambda p: p.stat().st_mtime_ns)
        except OSError:
            return
        for old in states[:-KEEP_FILES]:
            old.unlink(missing_ok=True)
            old.with_name(old.name[:-len('.state')] + '.json').unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as handle:
            handle.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
