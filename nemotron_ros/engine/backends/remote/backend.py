"""The remote backend: a GPU server decodes, the node keeps the prompt, grammar and deadlines.

A robot with a small SoC, or a fleet sharing one GPU box, sends each generation to an
OpenAI-compatible server (vLLM, trtllm-serve, SGLang, llama-server) and keeps every contract
of the local backends:

* The prompt is rendered and tokenized here, from a GGUF of the served model read for its
  vocabulary and chat template only, with the same :class:`PromptFormat` as the local
  backends: think switching, tool layout and the fixed prefix are identical, so the server's
  prefix cache sees the same prefix on every request.
* The grammar is built here and sent in the server's own field (:mod:`.flavors`); the answer
  is parsed and validated by :meth:`Backend.finish` exactly as locally, so an invalid call is
  never returned. Configure refuses a server that does not honour the grammar (one tiny
  constrained completion shows it) unless ``remote.require_grammar`` is false.
* Tokens are streamed: the first gives the time to first token, each feeds ``on_token``, and
  a deadline or cancel shuts the connection down at once (a watcher thread, so a silent server
  cannot hold the request), which makes the server abort the generation.
* Every fault (refused connection, DNS failure, HTTP 4xx/5xx, malformed stream, lost or stalled
  stream) ends the request with ``FinishReason.ERROR`` and the reason, never after its
  deadline; a failed connect or a 502/503/504 is retried only while the budget allows.

``Usage`` is reported like a local backend's (prefill = time to first token as seen here,
network included; decode rate from the streamed tokens), so admission control learns the
remote's real rates. The fixed prefix counts as reused when the previous request sent the
same one: the server's prefix cache keeps it (llama-server, llama_cpp.server, vLLM's and
SGLang's prefix caching). Where a server re-evaluates it anyway (a hybrid model on
llama_cpp.server), its constant cost lands in the fixed part of the estimator's prefill fit,
so admission stays right either way; a server that reports ``cached_tokens`` is believed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import httpx

from ... import settings
from ...prompt_format import select_prompt_format, vocab_markers
from ...tools import ToolRegistry
from ...types import (
    CancelToken,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Usage,
)
from ..base import Backend, BackendError, BackendHealth, ModelGuard, ModelInfo, Stopper
from ..decoding import TokenStream
from ..llama.context import LlamaLoadError
from . import flavors
from .vocab import GgufVocabulary

_LOG = logging.getLogger(__name__)

#: Statuses worth another attempt (the request never started on the server).
_RETRYABLE = frozenset({502, 503, 504})
#: How often a request's watcher checks its cancel token (seconds); it wakes at the deadline
#: itself. Streamed tokens check both at once, so this only bounds a silent server's cancel.
_WATCH_PERIOD_S = 0.05
#: Diagnostics probe the server at most this often (seconds).
_PROBE_PERIOD_S = 5.0
#: The configure check's grammar: a server that honours it can only write digits in order.
_CHECK_TEXT = '0123456789'


@dataclass
class RemoteConfig:
    """Settings of the remote backend (the node's ``remote.*`` parameters).

    :param url: base URL of the server (``/v1`` is appended).
    :param tokenizer_path: a GGUF of the served model, read for its tokenizer and template.
    :param model: the served model's name; '' = the only one the server lists.
    :param api_key_env: name of the environment variable holding the API key ('' = none).
    :param flavor: 'auto' (from the server's ``/v1/models``) or one of :data:`flavors.FLAVORS`.
    :param require_grammar: refuse a server that does not constrain with the grammar.
    :param connect_timeout_s: longest wait to connect.
    :param stall_timeout_s: longest wait for the next streamed token.
    :param max_retries: new attempts after a failed connect or a 502/503/504.
    :param n_ctx: context the node assumes (lowered to the server's ``max_model_len``).
    """

    url: str
    tokenizer_path: str
    model: str = settings.default('remote.model')
    api_key_env: str = settings.default('remote.api_key_env')
    flavor: str = settings.default('remote.flavor')
    require_grammar: bool = settings.default('remote.require_grammar')
    connect_timeout_s: float = settings.default('remote.connect_timeout_ms') / 1000.0
    stall_timeout_s: float = settings.default('remote.stall_timeout_ms') / 1000.0
    max_retries: int = settings.default('remote.max_retries')
    n_ctx: int = settings.default('n_ctx')

    def __post_init__(self) -> None:
        for name in ('remote.url', 'remote.model', 'remote.api_key_env', 'remote.flavor',
                     'remote.require_grammar', 'remote.max_retries', 'n_ctx'):
            settings.check(name, getattr(self, name.replace('remote.', '')))
        if not self.url:
            raise ValueError("remote.url is empty: the remote backend needs the server's URL "
                             '(e.g. http://gpu-box:8000)')
        if not self.tokenizer_path:
            raise ValueError('model_path is empty: the remote backend needs a GGUF of the '
                             'served model for its tokenizer and chat template')
        for name in ('connect_timeout_s', 'stall_timeout_s'):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float('inf')):
                raise ValueError(f'{name} must be a positive number of seconds, got {value!r}')
        self.url = self.url.rstrip('/')
        if self.url.endswith('/v1'):
            self.url = self.url[:-3]


class _Watcher:
    """Shuts a streaming response's socket down when its request's deadline or cancel fires.

    A blocked read on a silent server cannot check anything itself; shutting the socket down
    wakes it and tells the server that the client is gone, so the server aborts the request.
    """

    def __init__(self, response: httpx.Response, stopper: Stopper) -> None:
        self._response = response
        self._stopper = stopper
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name='remote-watch', daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = self._stopper.deadline
        while True:
            wait = _WATCH_PERIOD_S if deadline is None else \
                max(0.0, min(_WATCH_PERIOD_S, deadline - time.monotonic()))
            if self._done.wait(wait):
                return
            if self._stopper():
                _shutdown(self._response)
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _shutdown(response: httpx.Response) -> None:
    stream = response.extensions.get('network_stream')
    sock = stream.get_extra_info('socket') if stream is not None else None
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the server or by the reader


class _AttemptError(Exception):
    """One attempt failed; ``retry``: another may be tried; ``reachable``: the server answered."""

    def __init__(self, message: str, retry: bool = False, reachable: bool = True) -> None:
        super().__init__(message)
        self.retry = retry
        self.reachable = reachable


class RemoteBackend(Backend):
    """Generations on an OpenAI-compatible server; see the module docstring.

    One ``generate`` at a time (the scheduler's rule) plus any number of token counts.
    """

    def __init__(self, config: RemoteConfig, tools: ToolRegistry) -> None:
        super().__init__(tools)
        self.config = config
        self._guard = ModelGuard()
        self._vocab: Optional[GgufVocabulary] = None
        self._client: Optional[httpx.Client] = None
        self._model = config.model
        self._flavor = config.flavor
        self._constrains = False
        self._n_ctx = config.n_ctx
        self._sent_prefix = ''
        self.info: Optional[ModelInfo] = None
        self._health_lock = threading.Lock()
        self._reachable = False
        self._latency_s = 0.0
        self._last_error = ''
        self._probed_at = 0.0
        self._probing = False

    # -- lifecycle ------------------------------------------------------------------------
    def load(self, cancel: Optional[CancelToken] = None) -> ModelInfo:
        if self._client is not None:
            return self.info
        config = self.config
        self._model, self._flavor, self._n_ctx = config.model, config.flavor, config.n_ctx
        self._constrains, self._sent_prefix = False, ''
        try:
            vocab = GgufVocabulary(config.tokenizer_path)
        except LlamaLoadError as exc:
            raise BackendError(str(exc)) from exc
        try:
            arch = vocab.metadata('general.architecture') or 'unknown'
            self.prompt_format = select_prompt_format(
                {'general.architecture': arch, 'tokenizer.chat_template': vocab.chat_template()},
                bos_token=vocab.token_text(vocab.bos), eos_token=vocab.token_text(vocab.eos),
                special_tokens=vocab_markers(*vocab.special_token_texts()))
            client = httpx.Client(base_url=f'{config.url}/v1', headers=self._headers(),
                                  timeout=httpx.Timeout(config.stall_timeout_s,
                                                        connect=config.connect_timeout_s))
        except (ValueError, BackendError) as exc:
            vocab.close()
            raise BackendError(f'{config.tokenizer_path}: {exc}' if isinstance(exc, ValueError)
                               else str(exc)) from exc
        self._vocab, self._client = vocab, client
        try:
            self._check_server(cancel)
        except BaseException:
            self._close()
            raise
        self.info = ModelInfo(
            path=f'{config.url} ({self._model}, {self._flavor})', architecture=arch,
            chat_format=self.prompt_format.name, n_ctx=self._n_ctx, n_vocab=vocab.n_vocab,
            recurrent=vocab.recurrent)
        self._guard.open()
        return self.info

    def _headers(self) -> dict[str, str]:
        name = self.config.api_key_env
        if not name:
            return {}
        key = os.environ.get(name, '')
        if not key:
            raise BackendError(f'remote.api_key_env names the environment variable {name}, '
                               'which is not set or empty')
        return {'Authorization': f'Bearer {key}'}

    def _check_server(self, cancel: Optional[CancelToken]) -> None:
        """Reachable, the model served, the grammar honoured; BackendError names remote.url."""
        url = self.config.url
        started = time.monotonic()
        try:
            response = self._client.get('/models')
        except httpx.HTTPError as exc:
            raise BackendError(f'remote.url {url}: server not reachable: {_describe(exc)}') \
                from None
        self._record(True, time.monotonic() - started, '')
        if response.status_code in (401, 403):
            raise BackendError(f'remote.url {url}: the server refused the API key (HTTP '
                               f'{response.status_code}); set remote.api_key_env to the '
                               'variable that holds it')
        if response.status_code != 200:
            raise BackendError(f'remote.url {url}: GET /v1/models answered HTTP '
                               f'{response.status_code}: {_error_text(response)}')
        try:
            cards = [c for c in response.json()['data'] if isinstance(c, dict)]
        except (ValueError, KeyError, TypeError):
            raise BackendError(f'remote.url {url}: GET /v1/models is not an OpenAI model '
                               'list; is this an OpenAI-compatible server?') from None
        names = [str(c.get('id')) for c in cards]
        if not self._model:
            if len(names) != 1:
                raise BackendError(f'remote.url {url} serves {len(names)} models '
                                   f'({", ".join(names) or "none"}); set remote.model')
            self._model = names[0]
        if self._model not in names:
            raise BackendError(f'remote.url {url} does not serve remote.model '
                               f'{self._model!r}; it serves: {", ".join(names) or "nothing"}')
        card = cards[names.index(self._model)]
        if self._flavor == 'auto':
            self._flavor = flavors.detect(card.get('owned_by')) or 'unknown'
        limit = card.get('max_model_len')
        if isinstance(limit, int) and 0 < limit < self._n_ctx:
            self._n_ctx = limit
        if self._flavor == 'unknown':
            if self.config.require_grammar:
                raise BackendError(
                    f'remote.url {url}: cannot tell which server this is (owned_by '
                    f'{card.get("owned_by")!r}), so not how to send a grammar; set '
                    f'remote.flavor to one of {", ".join(flavors.FLAVORS)}, or '
                    'remote.require_grammar to false')
            _LOG.warning('remote.url %s: unknown server; tool calls are not constrained '
                         '(answers are still validated)', url)
            return
        self._constrains = self._grammar_honoured(cancel)

    def _grammar_honoured(self, cancel: Optional[CancelToken]) -> bool:
        """One tiny constrained completion: does the server keep to a grammar?"""
        url, field = self.config.url, flavors.GRAMMAR_FIELD[self._flavor]
        grammar = 'root ::= ' + ' '.join(f'"{c}"' for c in _CHECK_TEXT)
        text = 'Write a word:'
        body = flavors.completion_body(
            self._flavor, self._model, text, self._vocab.tokenize(text),
            SamplingParams(temperature=0.0, max_tokens=3), 3, grammar)
        deadline = time.monotonic() + self.config.connect_timeout_s + self.config.stall_timeout_s
        stopper = Stopper(GenerationRequest(messages=(), deadline=deadline, cancel=cancel))
        stream = TokenStream(Usage(), time.monotonic())
        finish, error = self._attempts(body, stopper, stream)
        out = stream.finish()
        if finish is FinishReason.ERROR:
            problem = f'a completion with {field} failed: {error}'
        elif finish in (FinishReason.DEADLINE, FinishReason.CANCELLED):
            problem = f'a completion with {field} did not answer in time'
        elif out and _CHECK_TEXT.startswith(out):
            return True
        else:
            problem = f'it ignored the grammar in {field} (answered {out[:40]!r})'
        if self.config.require_grammar or finish not in (FinishReason.STOP, FinishReason.LENGTH):
            raise BackendError(f'remote.url {url} ({self._flavor}): no grammar support: '
                               f'{problem}')
        _LOG.warning('remote.url %s: %s; tool calls are not constrained (answers are still '
                     'validated)', url, problem)
        return False

    def unload(self) -> None:
        """Close the connection pool and free the vocabulary (waits for a running request)."""
        self._guard.retire()
        self._close()

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None

    @property
    def loaded(self) -> bool:
        return self._client is not None

    @property
    def flavor(self) -> str:
        """The server kind in use (after ``auto`` was resolved at load)."""
        return self._flavor

    @property
    def constrains(self) -> bool:
        """True when tool calls are grammar-constrained on the server."""
        return self._constrains

    def count_tokens(self, text: str) -> int:
        with self._guard.use():
            return len(self._vocab.tokenize(text))

    def reuses_prefix(self, prefix: str) -> bool:
        return bool(prefix) and prefix == self._sent_prefix

    # -- generation -----------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> GenerationResult:
        with self._guard.use():
            return self._generate(request)

    def _generate(self, request: GenerationRequest) -> GenerationResult:
        started = time.monotonic()
        prepared = self.prepare(request, self._vocab.tokenize, self._n_ctx)
        usage = prepared.usage
        grammar = prepared.grammar if self._constrains else None
        body = flavors.completion_body(
            self._flavor, self._model, prepared.rendered.text, prepared.prefix + prepared.suffix,
            request.sampling, prepared.max_tokens, grammar, self._vocab.eog_tokens
            if request.sampling.ignore_eos and self._flavor == 'llama_cpp' else ())
        if self.reuses_prefix(prepared.rendered.prefix):
            usage.prompt_tokens_reused = len(prepared.prefix)
        stream = TokenStream(usage, started, request.on_token)
        finish, error = self._attempts(body, Stopper(request), stream)
        self._sent_prefix = prepared.rendered.prefix if finish is not FinishReason.ERROR else ''
        result = GenerationResult(usage=usage, raw_text=stream.finish(), finish_reason=finish,
                                  error=error)
        usage.total_s = time.monotonic() - started
        usage.prefill_s = usage.time_to_first_token_s if stream.started_decoding \
            else usage.total_s
        if finish is FinishReason.ERROR:
            _LOG.warning('remote request failed: %s', error)
        return self.finish(result, prepared)

    def _attempts(self, body: dict[str, Any], stopper: Stopper,
                  stream: TokenStream) -> tuple[FinishReason, str]:
        """Run the request, retrying what may be retried while the deadline allows."""
        attempt = 0
        while True:
            if stopper():
                return stopper.reason, ''
            began = time.monotonic()
            try:
                return self._stream(body, stopper, stream)
            except _AttemptError as failure:
                if stopper():
                    return stopper.reason, ''
                backoff = 0.05 * (2 ** attempt)
                spent = time.monotonic() - began
                fits = stopper.deadline is None or \
                    time.monotonic() + backoff + 2 * spent < stopper.deadline
                if not (failure.retry and attempt < self.config.max_retries and fits):
                    note = f' (after {attempt + 1} attempts)' if attempt else ''
                    self._record(failure.reachable, None, str(failure))
                    return FinishReason.ERROR, f'{failure}{note}'
                attempt += 1
                time.sleep(backoff)

    def _timeout(self, stopper: Stopper) -> httpx.Timeout:
        connect, stall = self.config.connect_timeout_s, self.config.stall_timeout_s
        if stopper.deadline is not None:
            left = max(0.001, stopper.deadline - time.monotonic())
            # A server silent before its headers is cut by this read timeout at the deadline;
            # once streaming, the watcher shuts the socket down then.
            connect, stall = min(connect, left), min(stall, left + 0.01)
        return httpx.Timeout(stall, connect=connect)

    def _stream(self, body: dict[str, Any], stopper: Stopper,
                stream: TokenStream) -> tuple[FinishReason, str]:
        """One attempt; _AttemptError when it failed before or while streaming."""
        url = self.config.url
        sent = time.monotonic()
        try:
            with self._client.stream('POST', '/completions', json=body,
                                     timeout=self._timeout(stopper)) as response:
                latency = time.monotonic() - sent
                watcher = _Watcher(response, stopper)
                try:
                    if response.status_code != 200:
                        response.read()
                        raise _AttemptError(f'{url} answered HTTP {response.status_code}: '
                                            f'{_error_text(response)}',
                                            retry=response.status_code in _RETRYABLE)
                    reason, error = self._read(response, stopper, stream)
                finally:
                    watcher.stop()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _AttemptError(f'cannot connect to {url}: {_describe(exc)}', retry=True,
                                reachable=False) from None
        except httpx.ReadTimeout:
            if stopper():
                return stopper.reason, ''
            raise _AttemptError(f'{url} stalled: no token for {self.config.stall_timeout_s:g} '
                                f's after {stream.usage.completion_tokens} tokens') from None
        except httpx.HTTPError as exc:
            if stopper():
                return stopper.reason, ''
            raise _AttemptError(f'connection to {url} lost after '
                                f'{stream.usage.completion_tokens} tokens: {_describe(exc)}') \
                from None
        self._record(True, latency, error)
        return reason, error

    def _read(self, response: httpx.Response, stopper: Stopper,
              stream: TokenStream) -> tuple[FinishReason, str]:
        """Consume the server-sent events of one completion."""
        url = self.config.url
        finish: Optional[str] = None
        server_tokens = 0
        done = False
        for line in response.iter_lines():
            if stopper():
                return stopper.reason, ''
            if not line.startswith('data:'):
                continue  # blank separators, comments, event and id fields
            data = line[5:].strip()
            if data == '[DONE]':
                done = True
                break
            try:
                event = json.loads(data)
                choices = event.get('choices')
                usage = event.get('usage')
            except (ValueError, AttributeError):
                return FinishReason.ERROR, f'malformed stream from {url}: {data[:80]!r}'
            if event.get('error'):
                return FinishReason.ERROR, f'{url} reported an error mid-stream: ' \
                    f'{_message(event["error"])}'
            if isinstance(usage, dict):
                server_tokens = _count(usage, 'completion_tokens') or server_tokens
                cached = _count(usage.get('prompt_tokens_details'), 'cached_tokens')
                if cached is not None:
                    stream.usage.prompt_tokens_reused = min(cached, stream.usage.prompt_tokens)
            if not choices:
                continue  # the usage-only chunk that ends a vLLM/SGLang/TRT-LLM stream
            choice = choices[0] if isinstance(choices, list) else None
            text = choice.get('text') if isinstance(choice, dict) else None
            if not isinstance(text, str):
                return FinishReason.ERROR, f'malformed stream from {url}: {data[:80]!r}'
            finish = choice.get('finish_reason') or finish
            if text or finish is None:
                stream.add_text(text)
            if stopper():
                return stopper.reason, ''
        if stopper():
            return stopper.reason, ''
        if server_tokens:
            stream.usage.completion_tokens = server_tokens
        if finish == 'stop':
            return FinishReason.STOP, ''
        if finish == 'length':
            return FinishReason.LENGTH, ''
        if finish is None:
            return FinishReason.ERROR, (
                f'{url} ended the stream after {stream.usage.completion_tokens} tokens without '
                f'a finish reason{"" if done else " or [DONE]"}: the server dropped the request '
                '(its log says why; llama_cpp.server also drops a request when another arrives '
                'unless started with --interrupt_requests False)')
        return FinishReason.ERROR, f'{url} ended the generation: finish_reason {finish!r}'

    # -- diagnostics ----------------------------------------------------------------------
    def _record(self, reachable: bool, latency_s: Optional[float], error: str) -> None:
        with self._health_lock:
            self._reachable = reachable
            if latency_s:
                self._latency_s = latency_s
            self._last_error = error
            self._probed_at = time.monotonic()

    def health(self) -> BackendHealth:
        """Reachability and round-trip latency (``GET /v1/models``), probed in the background."""
        with self._health_lock:
            due = not self._probing and time.monotonic() - self._probed_at > _PROBE_PERIOD_S
            if due and self._client is not None:
                self._probing = True
                threading.Thread(target=self._probe, name='remote-probe', daemon=True).start()
            values = (('remote.url', self.config.url), ('remote.flavor', self._flavor),
                      ('remote.model', self._model),
                      ('remote.grammar', flavors.GRAMMAR_FIELD.get(self._flavor, '')
                       if self._constrains else 'none'),
                      ('remote.reachable', str(self._reachable).lower()),
                      ('remote.latency_ms', f'{self._latency_s * 1000:.1f}'),
                      ('remote.last_error', self._last_error))
            ok, error = self._reachable, self._last_error
        return BackendHealth(ok=ok, message='' if ok else f'remote server: {error}',
                             values=values)

    def _probe(self) -> None:
        client = self._client
        started = time.monotonic()
        try:
            if client is None:
                return
            response = client.get('/models', timeout=self.config.connect_timeout_s)
            if response.status_code == 200:
                self._record(True, time.monotonic() - started, '')
            else:
                self._record(False, None, f'GET /v1/models answered HTTP '
                             f'{response.status_code}')
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: closed by unload
            self._record(False, None, f'{self.config.url} not reachable: {_describe(exc)}')
        finally:
            with self._health_lock:
                self._probing = False


def _count(data: object, key: str) -> Optional[int]:
    """``data[key]`` when ``data`` is a dict holding an integer there, else None."""
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _describe(exc: BaseException) -> str:
    """A network error in words: its type and message, never the request (no headers)."""
    text = str(exc) or type(exc).__name__
    return f'{type(exc).__name__}: {text}' if text != type(exc).__name__ else text


def _message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get('message') or error)[:200]
    return str(error)[:200]


def _error_text(response: httpx.Response) -> str:
    """The server's error message (OpenAI ``{"error": {"message": ...}}`` or FastAPI's)."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:200] or '(empty body)'
    if isinstance(data, dict):
        for key in ('error', 'detail', 'message'):
            if data.get(key):
                return _message(data[key])
    return str(data)[:200]
