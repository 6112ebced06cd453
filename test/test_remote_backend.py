"""The remote backend against a real OpenAI-compatible server on loopback.

llama-cpp-python's own server (``llama_cpp.server``) runs as a subprocess with the tiny
nemotron_h GGUF and with SmolLM2: the node renders prompts and grammars, the server decodes,
and every contract of the local backends is checked through it (constrained calls, deadlines,
cancel, identical greedy output, the node's served paths, multi-step tasks).

Faults come from the real server wherever it can produce them (not running, killed
mid-stream, wrong model, a prompt longer than its context, a refused API key). A small TCP
proxy in front of the real server produces what it cannot: a stream that stalls mid-way,
an HTTP 500 or 503 and a malformed event stream.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import spin_until, wait_for

pytest.importorskip('httpx', reason='the remote backend needs httpx: run tools/setup.sh')
pytest.importorskip('uvicorn', reason="llama_cpp.server needs llama-cpp-python's [server] "
                    'extra: run tools/setup.sh')
rclpy = pytest.importorskip('rclpy', reason='rclpy is not installed: run tools/setup.sh')

from action_msgs.msg import GoalStatus  # noqa: E402
from backend_cases import TOOLS, assert_constrained_calls_valid_over_200_seeds, chat  # noqa: E402
from node_harness import (  # noqa: E402
    SUCCESS,
    Client,
    FakeExecutor,
    node_status,
    serve_execute,
    status_values,
)

from nemotron_ros.action import Execute  # noqa: E402
from nemotron_ros.engine.backends import BackendError  # noqa: E402
from nemotron_ros.engine.backends.llama.backend import LlamaBackend, LlamaConfig  # noqa: E402
from nemotron_ros.engine.backends.remote.backend import (  # noqa: E402
    RemoteBackend,
    RemoteConfig,
)
from nemotron_ros.engine.runtime import Engine, EngineLoadError  # noqa: E402
from nemotron_ros.engine.types import (  # noqa: E402
    CancelToken,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    ToolChoice,
)
from nemotron_ros.msg import Action, Command  # noqa: E402
from nemotron_ros.testing.llama_server import LlamaCppServer, free_port, server_params  # noqa: E402
from nemotron_ros.testing.models import smollm2_gguf_path  # noqa: E402

SECRET = 'sk-nemotron-test-7f3a9c'


def _story(**fields) -> GenerationRequest:
    """A long unconstrained generation (ignore_eos) after a short prompt (no tools), for
    deadlines, cancel and faults: its first token comes quickly even on a loaded machine."""
    sampling = SamplingParams(max_tokens=fields.pop('max_tokens', 2000), ignore_eos=True)
    return GenerationRequest(messages=chat('Tell a long story.'),
                             tools=fields.pop('tools', ()), constrained=False,
                             sampling=sampling, **fields)


@pytest.fixture(scope='module')
def smol_path() -> str:
    try:
        return str(smollm2_gguf_path())
    except FileNotFoundError as exc:
        pytest.skip(f'SmolLM2 GGUF not installed: {exc}')


@pytest.fixture(scope='module')
def tiny_server(tiny_model: str, tmp_path_factory) -> Iterator[LlamaCppServer]:
    log = str(tmp_path_factory.mktemp('server') / 'tiny.log')
    with LlamaCppServer(tiny_model, alias='tiny', log=log) as server:
        yield server


@pytest.fixture(scope='module')
def smol_server(smol_path: str, tmp_path_factory) -> Iterator[LlamaCppServer]:
    log = str(tmp_path_factory.mktemp('server') / 'smol.log')
    with LlamaCppServer(smol_path, alias='smol', log=log) as server:
        yield server


def _remote(url: str, tokenizer: str, **options) -> RemoteBackend:
    backend = RemoteBackend(RemoteConfig(url=url, tokenizer_path=tokenizer, **options), TOOLS)
    backend.load()
    return backend


@pytest.fixture(scope='module')
def tiny(tiny_server: LlamaCppServer, tiny_model: str) -> Iterator[RemoteBackend]:
    backend = _remote(tiny_server.url, tiny_model, n_ctx=8192)
    yield backend
    backend.unload()


@pytest.fixture(scope='module')
def smol(smol_server: LlamaCppServer, smol_path: str) -> Iterator[RemoteBackend]:
    backend = _remote(smol_server.url, smol_path, n_ctx=8192, stall_timeout_s=120.0)
    yield backend
    backend.unload()


class FaultProxy:
    """A TCP proxy in front of a real server that can break what the server itself won't.

    ``freeze()`` stops passing the server's bytes on while keeping both connections open (a
    server that stalls mid-stream); ``answer(status, body)`` makes the proxy itself answer the
    next ``times`` completion requests (an HTTP error or a malformed stream).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.url = f'http://127.0.0.1:{self.listener.getsockname()[1]}'
        self.frozen = threading.Event()
        self._lock = threading.Lock()
        self._answers: list[tuple[int, bytes]] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.frozen.set()

    def answer(self, status: int, body: bytes, times: int = 1,
               content_type: str = 'application/json') -> None:
        head = (f'HTTP/1.1 {status} Injected\r\nContent-Type: {content_type}\r\n'
                f'Content-Length: {len(body)}\r\n\r\n').encode()
        with self._lock:
            self._answers += [(status, head + body)] * times

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(('127.0.0.1', self.upstream))
            self._sockets += [client, upstream]
            threading.Thread(target=self._to_server, args=(client, upstream),
                             daemon=True).start()
            threading.Thread(target=self._to_client, args=(upstream, client),
                             daemon=True).start()

    def _to_server(self, client: socket.socket, upstream: socket.socket) -> None:
        buffer = b''
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buffer += data
                while buffer:
                    head, sep, rest = buffer.partition(b'\r\n\r\n')
                    if not sep:
                        break
                    length = int(re.search(rb'(?i)content-length:\s*(\d+)', head).group(1)) \
                        if re.search(rb'(?i)content-length', head) else 0
                    if len(rest) < length:
                        break
                    request, buffer = head + sep + rest[:length], rest[length:]
                    with self._lock:
                        injected = self._answers.pop(0) if self._answers and \
                            request.startswith(b'POST /v1/completions') else None
                    if injected is not None:
                        client.sendall(injected[1])
                    else:
                        upstream.sendall(request)
        except OSError:
            pass
        finally:
            upstream.close()

    def _to_client(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if self.frozen.is_set():
                    continue  # swallow: the client sees a server that went silent
                client.sendall(data)
        except OSError:
            pass


@pytest.fixture
def proxy(tiny_server: LlamaCppServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(tiny_server.port)
    yield proxy
    proxy.close()


# -- configure ------------------------------------------------------------------------------
def test_configure_finds_the_server_its_model_and_grammar(tiny: RemoteBackend) -> None:
    assert tiny.flavor == 'llama_cpp' and tiny.constrains
    assert tiny.info.architecture == 'nemotron_h' and tiny.info.chat_format == 'nemotron'
    assert tiny.info.recurrent and tiny.info.path == f'{tiny.config.url} (tiny, llama_cpp)'
    health = tiny.health()
    values = dict(health.values)
    assert health.ok and values['remote.reachable'] == 'true'
    assert float(values['remote.latency_ms']) > 0 and values['remote.grammar'] == 'grammar'


@pytest.mark.parametrize('url', ['http://127.0.0.1:{port}', 'http://no-such-host.invalid:8000'])
def test_configure_fails_in_one_line_naming_the_url_when_nothing_answers(
        url: str, tiny_model: str) -> None:
    url = url.format(port=free_port())
    backend = RemoteBackend(RemoteConfig(url=url, tokenizer_path=tiny_model), TOOLS)
    with pytest.raises(BackendError, match=rf'remote.url {re.escape(url)}: server not '
                       r'reachable') as error:
        backend.load()
    assert '\n' not in str(error.value) and not backend.loaded


def test_a_wrong_model_name_fails_configure(tiny_server: LlamaCppServer, tiny_model: str) -> None:
    backend = RemoteBackend(RemoteConfig(url=tiny_server.url, tokenizer_path=tiny_model,
                                         model='nemotron-9000'), TOOLS)
    with pytest.raises(BackendError, match=r"does not serve remote.model 'nemotron-9000'; it "
                       r'serves: tiny'):
        backend.load()


def test_an_unknown_server_is_refused_unless_grammar_is_optional(
        proxy: FaultProxy, tiny_model: str) -> None:
    """A server whose grammar field is ignored fails configure (it answers off-grammar)."""
    ignoring = (b'data: {"choices": [{"text": "hello", "index": 0, "finish_reason": null}]}\n\n'
                b'data: {"choices": [{"text": "", "index": 0, "finish_reason": "length"}]}\n\n'
                b'data: [DONE]\n\n')
    proxy.answer(200, ignoring, content_type='text/event-stream')
    with pytest.raises(BackendError, match=r'no grammar support: it ignored the grammar in '
                       r"grammar \(answered 'hello'\)"):
        _remote(proxy.url, tiny_model)
    proxy.answer(200, ignoring, content_type='text/event-stream')
    backend = _remote(proxy.url, tiny_model, require_grammar=False)
    try:
        assert not backend.constrains and dict(backend.health().values)['remote.grammar'] == \
            'none'
        result = backend.generate(GenerationRequest(
            messages=chat('Stop.'), tools=['stop'], tool_choice=ToolChoice.REQUIRED,
            sampling=SamplingParams(max_tokens=16)))
        # Unconstrained, the model may stop or fill max_tokens: either is a legitimate end;
        # what the contract promises is that no invalid call comes back.
        assert result.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert all(TOOLS.validate_call(c.name, c.arguments) == [] for c in result.tool_calls)
    finally:
        backend.unload()


def test_each_flavor_sends_the_grammar_in_its_own_field() -> None:
    from nemotron_ros.engine.backends.remote.flavors import completion_body, detect
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)
    bodies = {f: completion_body(f, 'm', 'text', [1, 2], sampling, 8, 'root ::= "x"', (7,))
              for f in ('llama_cpp', 'vllm', 'sglang', 'trtllm')}
    assert bodies['llama_cpp']['grammar'] == 'root ::= "x"'
    assert bodies['vllm']['structured_outputs'] == {'grammar': 'root ::= "x"'}
    assert bodies['sglang']['ebnf'] == 'root ::= "x"'
    assert bodies['trtllm']['response_format'] == {'type': 'ebnf', 'ebnf': 'root ::= "x"'}
    assert bodies['llama_cpp']['prompt'] == 'text'
    assert all(bodies[f]['prompt'] == [1, 2] and bodies[f]['skip_special_tokens'] is False
               for f in ('vllm', 'sglang', 'trtllm'))
    assert not any(bodies[f]['ignore_eos'] for f in ('vllm', 'sglang', 'trtllm')), \
        'a finished grammar allows nothing else: ignore_eos only without one'
    free = completion_body('llama_cpp', 'm', 'text', [1], sampling, 8, None, (7,))
    assert free['logit_bias'] == {'7': -1.0e9} and 'grammar' not in free
    assert [detect(o) for o in ('vllm', 'sglang', 'tensorrt_llm', 'llamacpp', 'me', 'x')] == \
        ['vllm', 'sglang', 'trtllm', 'llama_cpp', 'llama_cpp', None]


# -- generation -----------------------------------------------------------------------------
@pytest.mark.slow
def test_constrained_calls_always_parse_and_validate_over_200_seeds(tiny: RemoteBackend) -> None:
    """The local backend's 200-seed test through the server (about 0.25 s a generation on an
    idle host: llama_cpp.server re-evaluates the hybrid model's whole prompt per request)."""
    assert_constrained_calls_valid_over_200_seeds(tiny)


@pytest.mark.slow
def test_greedy_output_is_the_local_backends_token_for_token(smol: RemoteBackend,
                                                             smol_path: str) -> None:
    """Same GGUF, same prompt, same computation (no prefix split, flash attention on)."""
    local = LlamaBackend(LlamaConfig(model_path=smol_path, n_ctx=8192, n_threads=1,
                                     prefix_cache=False, flash_attn='on'), TOOLS)
    local.load()
    try:
        offered = ['navigate_to', 'say', 'stop']  # a short prompt: two cores, shared
        for request in (
                GenerationRequest(messages=chat('Tell me about the kitchen.'),
                                  tools=offered, constrained=False,
                                  sampling=SamplingParams(max_tokens=40)),
                GenerationRequest(messages=chat('Go to the kitchen'), tools=offered,
                                  tool_choice=ToolChoice.REQUIRED, max_tool_calls=1,
                                  sampling=SamplingParams(max_tokens=64))):
            here, there = local.generate(request), smol.generate(request)
            assert there.raw_text == here.raw_text and there.raw_text
            assert there.finish_reason is here.finish_reason
            assert there.tool_calls == here.tool_calls
            assert there.usage.prompt_tokens == here.usage.prompt_tokens
            assert there.usage.completion_tokens == here.usage.completion_tokens
    finally:
        local.unload()
    assert [c.name for c in there.tool_calls] == ['navigate_to']


def test_usage_is_reported_like_a_local_backend(tiny: RemoteBackend) -> None:
    pieces: list[str] = []
    result = tiny.generate(_story(max_tokens=12, on_token=pieces.append))
    usage = result.usage
    assert result.finish_reason is FinishReason.LENGTH and usage.completion_tokens == 12
    assert ''.join(pieces) == result.raw_text
    assert usage.prompt_tokens == tiny.count_prompt_tokens(_story())
    assert 0 < usage.time_to_first_token_s == usage.prefill_s <= usage.total_s
    assert usage.decode_s > 0 and usage.tokens_per_second > 0


def test_a_deadline_in_decode_closes_the_stream_and_the_server_moves_on(
        tiny: RemoteBackend) -> None:
    tokens: list[str] = []
    start = time.monotonic()
    deadline = start + 1.0

    def count(piece: str) -> None:
        tokens.append(piece)

    result = tiny.generate(_story(max_tokens=100_000, deadline=deadline, on_token=count))
    assert result.finish_reason is FinishReason.DEADLINE
    assert time.monotonic() - deadline < 1.0
    assert 0 < result.usage.completion_tokens < 100_000 and result.tool_calls == []
    after = tiny.generate(_story(max_tokens=4))
    assert after.finish_reason is FinishReason.LENGTH, after.error


def test_cancel_mid_stream_ends_cancelled(tiny: RemoteBackend) -> None:
    cancel = CancelToken()
    seen: list[str] = []

    def on_token(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 5:
            cancel.cancel()

    result = tiny.generate(_story(max_tokens=100_000, cancel=cancel, on_token=on_token))
    assert result.finish_reason is FinishReason.CANCELLED
    assert result.usage.completion_tokens < 100
    assert tiny.generate(_story(max_tokens=4)).finish_reason is FinishReason.LENGTH


# -- faults ---------------------------------------------------------------------------------
def _after_tokens(count: int, fault: Callable[[], None]) -> Callable[[str], None]:
    """An ``on_token`` that injects ``fault`` once ``count`` tokens have streamed."""
    seen: list[str] = []

    def on_token(piece: str) -> None:
        seen.append(piece)
        if len(seen) == count:
            fault()

    return on_token


def test_a_server_killed_mid_stream_ends_error_and_reports_unreachable(
        tiny_model: str, tmp_path: Path) -> None:
    with LlamaCppServer(tiny_model, alias='tiny', log=str(tmp_path / 'log')) as server:
        backend = _remote(server.url, tiny_model, max_retries=2)
        try:
            deadline = time.monotonic() + 20.0
            result = backend.generate(_story(deadline=deadline,
                                             on_token=_after_tokens(3, server.kill)))
            assert result.finish_reason is FinishReason.ERROR
            assert re.search(r'connection to http://127.0.0.1:\d+ lost after \d+ tokens',
                             result.error), result.error
            assert time.monotonic() < deadline and result.tool_calls == []
            again = backend.generate(_story(max_tokens=4, deadline=time.monotonic() + 5.0))
            assert again.finish_reason is FinishReason.ERROR
            assert 'cannot connect to' in again.error and '(after 3 attempts)' in again.error
            health = backend.health()
            assert not health.ok and 'cannot connect' in health.message
        finally:
            backend.unload()


def test_a_stalled_stream_ends_at_the_deadline_or_after_the_stall_timeout(
        proxy: FaultProxy, tiny_model: str) -> None:
    backend = _remote(proxy.url, tiny_model)
    backend.config.stall_timeout_s = 0.5  # after configure, whose grammar check may be slow
    try:
        deadline = time.monotonic() + 0.3
        result = backend.generate(_story(deadline=deadline,
                                         on_token=_after_tokens(3, proxy.freeze)))
        assert result.finish_reason is FinishReason.DEADLINE
        assert time.monotonic() - deadline < 0.5
        # Still frozen: now the server's headers never arrive either.
        deadline = time.monotonic() + 0.3
        result = backend.generate(_story(max_tokens=8, deadline=deadline))
        assert result.finish_reason is FinishReason.DEADLINE
        assert time.monotonic() - deadline < 0.5
        result = backend.generate(_story(max_tokens=8))
        assert result.finish_reason is FinishReason.ERROR
        assert re.search(r'stalled: no token for 0.5 s after 0 tokens', result.error)
    finally:
        backend.unload()


def test_http_errors_and_a_malformed_stream_end_error_and_503_is_retried_in_budget(
        proxy: FaultProxy, tiny_model: str) -> None:
    backend = _remote(proxy.url, tiny_model, max_retries=1)
    try:
        proxy.answer(500, b'{"error": {"message": "CUDA error: out of memory"}}')
        result = backend.generate(_story(max_tokens=4))
        assert result.finish_reason is FinishReason.ERROR
        assert result.error == f'{proxy.url} answered HTTP 500: CUDA error: out of memory'
        proxy.answer(503, b'{"error": {"message": "busy"}}')
        result = backend.generate(_story(max_tokens=4, deadline=time.monotonic() + 10.0))
        assert result.finish_reason is FinishReason.LENGTH, result.error
        proxy.answer(503, b'{"error": {"message": "busy"}}', times=2)
        result = backend.generate(_story(max_tokens=4, deadline=time.monotonic() + 10.0))
        assert result.error == f'{proxy.url} answered HTTP 503: busy (after 2 attempts)'
        proxy.answer(200, b'data: {"choices": [{"tex', content_type='text/event-stream')
        result = backend.generate(_story(max_tokens=4))
        assert result.finish_reason is FinishReason.ERROR
        assert result.error.startswith(f'malformed stream from {proxy.url}')
        assert backend.generate(_story(max_tokens=4)).finish_reason is FinishReason.LENGTH
    finally:
        backend.unload()


def test_a_prompt_longer_than_the_servers_context_ends_error(smol_path: str,
                                                             tmp_path: Path) -> None:
    """llama_cpp.server fails such a stream after its 200: no event, no [DONE]."""
    with LlamaCppServer(smol_path, alias='smol', n_ctx=256, log=str(tmp_path / 'log')) as server:
        backend = RemoteBackend(RemoteConfig(url=server.url, tokenizer_path=smol_path), TOOLS)
        backend.load()
        try:
            result = backend.generate(_story(max_tokens=4, tools=TOOLS.names))
            assert result.finish_reason is FinishReason.ERROR
            assert re.search(r'ended the stream after 0 tokens without a finish reason or '
                             r'\[DONE\]: the server dropped the request', result.error), \
                result.error
        finally:
            backend.unload()


def test_the_api_key_comes_from_the_named_variable_and_is_never_logged(
        tiny_model: str, tmp_path: Path, monkeypatch, caplog, capfd) -> None:
    caplog.set_level(logging.DEBUG)
    with LlamaCppServer(tiny_model, alias='tiny', api_key=SECRET,
                        log=str(tmp_path / 'log')) as server:
        config = {'url': server.url, 'tokenizer_path': tiny_model,
                  'api_key_env': 'NEMOTRON_TEST_KEY'}
        with pytest.raises(BackendError, match='names the environment variable '
                           'NEMOTRON_TEST_KEY, which is not set'):
            RemoteBackend(RemoteConfig(**config), TOOLS).load()
        monkeypatch.setenv('NEMOTRON_TEST_KEY', 'wrong-key')
        with pytest.raises(BackendError, match=r'refused the API key \(HTTP 401\)'):
            RemoteBackend(RemoteConfig(**config), TOOLS).load()
        monkeypatch.setenv('NEMOTRON_TEST_KEY', SECRET)
        backend = RemoteBackend(RemoteConfig(**config), TOOLS)
        backend.load()
        try:
            result = backend.generate(_story(max_tokens=4))
            assert result.finish_reason is FinishReason.LENGTH, result.error
            server.kill()  # the key is rotated on the server: requests get its real 401
            with LlamaCppServer(tiny_model, alias='tiny', api_key='rotated', port=server.port,
                                log=str(tmp_path / 'log')):
                failed = backend.generate(_story(max_tokens=4))
            assert failed.finish_reason is FinishReason.ERROR
            assert failed.error == f'{server.url} answered HTTP 401: Invalid API key'
            shown = [failed.error, backend.health().message, str(backend.health().values),
                     str(backend.info), repr(backend.config)]
        finally:
            backend.unload()
    out, err = capfd.readouterr()
    assert caplog.records, 'the DEBUG capture saw nothing: the check would be vacuous'
    for text in (caplog.text, out, err, *shown):
        assert SECRET not in text


# -- the node -------------------------------------------------------------------------------
@pytest.fixture
def remote_node(ros, node_factory, tiny_server: LlamaCppServer, tiny_model: str):
    """An active node whose backend is the tiny model on the loopback server, + client."""

    def make(**extra):
        node = node_factory(tiny_model, **server_params(tiny_server, **extra))
        client = Client(ros)
        assert wait_for(client.connected, 10.0)
        return node, client

    return make


@pytest.mark.ros
def test_served_command_plan_and_admission_through_the_server(remote_node) -> None:
    node, client = remote_node()
    request_id = client.command('Go to the kitchen', request_id='cmd-1')
    action = client.answer(request_id)
    assert action.status == Action.STATUS_OK, action.status_message
    assert action.prompt_tokens > 0 and action.time_to_first_token_ms > 0
    assert [(c.id, c.name) for c in client.tool_calls] == \
        [(c.id, c.name) for c in action.tool_calls]
    plan = client.plan(goal='Go to the kitchen', latency_budget_ms=10000,
                       allowed_tools=['navigate_to', 'say'], max_tokens=48)
    assert plan.status == Action.STATUS_OK, plan.status_message
    assert {c.name for c in plan.tool_calls} <= {'navigate_to', 'say'}
    # Admission control learned the server's rates at warm-up: 1 ms cannot fit.
    rejected = client.plan(goal='Go to the kitchen', latency_budget_ms=1)
    assert rejected.status == Action.STATUS_REJECTED_BUDGET, rejected.status_message
    assert 'estimate' in rejected.status_message
    assert wait_for(lambda: status_values(node_status(client, node.get_fully_qualified_name()))
                    .get('remote.reachable') == 'true', 10.0)
    values = status_values(node_status(client, node.get_fully_qualified_name()))
    assert float(values['remote.latency_ms']) > 0 and values['remote.flavor'] == 'llama_cpp'


@pytest.mark.ros
def test_configure_fails_with_one_line_naming_the_url(ros, node_factory, tiny_model,
                                                      capfd) -> None:
    url = f'http://127.0.0.1:{free_port()}'
    node = node_factory(tiny_model, activate=False, backend='remote', **{'remote.url': url})
    assert node.trigger_configure() != SUCCESS
    assert node._engine.backend is None
    lines = [line for line in capfd.readouterr().err.splitlines() if f'remote.url {url}' in line]
    assert len(lines) == 1 and 'server not reachable' in lines[0], lines


@pytest.mark.ros
def test_execute_streams_feedback_and_cancel_ends_canceled(
        ros, node_factory, tiny_server, tiny_model) -> None:
    _node, caller = serve_execute(ros, lambda namespace: node_factory(
        tiny_model, namespace=namespace, **server_params(tiny_server, max_tokens=4000)))
    feedback = []
    goal = Execute.Goal(goal='Tell a very long story.', latency_budget_ms=60000,
                        max_tokens=4000)
    sent = caller.client.send_goal_async(goal, feedback_callback=feedback.append)
    assert spin_until(caller.executor, sent.done, 10.0)
    handle = sent.result()
    assert handle.accepted
    result = handle.get_result_async()
    assert spin_until(caller.executor,
                      lambda: sum(f.feedback.completion_tokens > 0 for f in feedback) >= 2,
                      30.0), 'no streamed feedback'
    assert not result.done()
    cancel = handle.cancel_goal_async()
    assert spin_until(caller.executor, cancel.done, 10.0)
    assert spin_until(caller.executor, result.done, 30.0)
    assert result.result().status == GoalStatus.STATUS_CANCELED
    assert result.result().result.action.status == Action.STATUS_CANCELED


@pytest.mark.ros
def test_a_three_step_task_runs_through_the_server(ros, remote_node, tmp_path: Path) -> None:
    tools = tmp_path / 'tools.yaml'
    tools.write_text('tools:\n  - name: get_battery\n    description: Report the battery '
                     'charge.\n    parameters: {type: object, properties: {}}\n')
    _node, client = remote_node(tools_file=str(tools), tool_choice='required', max_tokens=48,
                                max_tool_calls=1, tool_result_timeout_ms=20000)
    executor = FakeExecutor(ros, answer=lambda call: {'percent': 70})
    assert wait_for(executor.connected, 10.0)
    client.command_pub.publish(Command(id='task-1', text='Check the battery three times',
                                       max_steps=3, latency_budget_ms=60000))
    assert wait_for(lambda: any(a.final for a in client.answers('task-1')), 60.0)
    actions = sorted(client.answers('task-1'), key=lambda a: a.step)
    assert [(a.step, a.final) for a in actions] == [(0, False), (1, False), (2, True)]
    assert all(a.status == Action.STATUS_OK for a in actions), actions
    assert [c.name for a in actions for c in a.tool_calls] == ['get_battery'] * 3
    assert len(executor.calls) == 3


def test_remote_settings_reach_the_backend() -> None:
    from nemotron_ros.engine.config import EngineConfig
    config = EngineConfig.from_parameters({
        'backend': 'remote', 'remote.url': 'http://gpu:8000/v1', 'remote.flavor': 'vllm',
        'remote.api_key_env': 'GPU_KEY', 'remote.stall_timeout_ms': 1500})
    options = config.backend_options('/models/nano.gguf')
    remote = RemoteConfig(**options)
    assert remote.url == 'http://gpu:8000' and remote.flavor == 'vllm'
    assert remote.stall_timeout_s == 1.5 and remote.tokenizer_path == '/models/nano.gguf'
    with pytest.raises(ValueError, match=r"remote.url must be '' or an http:// or https:// URL"):
        EngineConfig.from_parameters({'remote.url': 'gpu:8000'})
    with pytest.raises(ValueError, match='remote.api_key_env must be'):
        EngineConfig.from_parameters({'remote.api_key_env': 'sk-123 secret'})
    with pytest.raises(ValueError, match='remote.url is empty'):
        RemoteConfig(url='', tokenizer_path='/models/nano.gguf')


def test_remote_without_model_path_is_refused_at_load() -> None:
    # The embedded default tokenizes for SmolLM2, not for whatever model the server serves.
    from nemotron_ros.engine.config import EngineConfig
    engine = Engine()
    with pytest.raises(EngineLoadError, match='backend remote needs model_path'):
        engine.load(EngineConfig(backend='remote', remote_url='http://127.0.0.1:9'))
    assert engine.info is None
