"""A real OpenAI-compatible server on loopback for the remote backend's tests and benchmark.

llama-cpp-python's own server (``python -m llama_cpp.server``, the ``[server]`` extra) runs the
same GGUF files as the local backend, so remote and local answers can be compared token for
token. It is started as a subprocess on a free port of 127.0.0.1 and is ready once
``GET /v1/models`` answers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class LlamaCppServer:
    """``llama_cpp.server`` serving one GGUF as ``alias`` on 127.0.0.1; a context manager.

    :param n_threads: 1 by default: the test machines have two cores, shared.
    :param flash_attn: on, as the local backend's 'auto' picks on CPU, so that greedy answers
        of the two are numerically the same computation.
    :param api_key: when set, every request needs it as a bearer token.
    :param log: file that receives the server's output ('' = discarded).
    :param port: 0 = a free one (a restart passes the previous server's).
    """

    def __init__(self, model: str, alias: str = 'model', n_ctx: int = 8192,
                 n_threads: int = 1, flash_attn: bool = True, api_key: str = '',
                 log: str = '', port: int = 0) -> None:
        self.model, self.alias, self.port = model, alias, port or free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.api_key = api_key
        self._args = [sys.executable, '-m', 'llama_cpp.server', '--model', model,
                      '--model_alias', alias, '--host', '127.0.0.1', '--port', str(self.port),
                      '--n_ctx', str(n_ctx), '--n_threads', str(n_threads),
                      '--flash_attn', str(flash_attn), '--verbose', 'False',
                      '--interrupt_requests', 'False']
        if api_key:
            self._args += ['--api_key', api_key]
        self._log = log
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 120.0) -> LlamaCppServer:
        """Start the server and wait until it lists its model; RuntimeError if it never does."""
        out = open(self._log, 'ab') if self._log else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self._args, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        finally:
            if self._log:
                out.close()
        headers = {'Authorization': f'Bearer {self.api_key}'} if self.api_key else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f'llama_cpp.server exited with {self.process.returncode} '
                                   f'before it was ready ({" ".join(self._args)})')
            try:
                if httpx.get(f'{self.url}/v1/models', headers=headers,
                             timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f'llama_cpp.server on {self.url} was not ready in {timeout:g} s')

    def kill(self) -> None:
        """SIGKILL at once (a server dying mid-stream)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(3.0)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> LlamaCppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_params(server: LlamaCppServer, **extra: object) -> dict:
    """Node parameters that run ``backend: remote`` against ``server`` (``model_path`` is the
    same GGUF, for the tokenizer)."""
    return {'backend': 'remote', 'remote.url': server.url, 'remote.model': server.alias,
            **extra}
