"""The llama.cpp backend with real models: constrained tool calls, deadlines, cancel, prefix reuse.

Uses the tiny random-weight nemotron_h GGUF built by project code (runs llama.cpp's real hybrid
Mamba-2/attention code path) and the real SmolLM2-135M-Instruct GGUF where words matter.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from backend_cases import TOOLS, assert_constrained_calls_valid_over_200_seeds, chat

from nemotron_ros.engine.backends import BackendError, RequestError
from nemotron_ros.engine.backends.llama.backend import LlamaBackend, LlamaConfig
from nemotron_ros.engine.types import (
    CancelToken,
    FinishReason,
    GenerationRequest,
    Message,
    SamplingParams,
    ToolChoice,
)
from nemotron_ros.testing import MID_PRESET
from nemotron_ros.testing.models import smollm2_gguf_path, tiny_nemotron_h_path


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp('models')


@pytest.fixture(scope='module')
def tiny(model_dir: Path):
    backend = LlamaBackend(LlamaConfig(model_path=str(tiny_nemotron_h_path(model_dir)),
                                       n_ctx=8192, n_threads=1), TOOLS)
    backend.load()
    yield backend
    backend.unload()


def test_tiny_model_loads_as_hybrid_with_native_format(tiny: LlamaBackend) -> None:
    assert tiny.info.architecture == 'nemotron_h'
    assert tiny.info.recurrent
    assert tiny.info.chat_format == 'nemotron'


def test_a_conversation_is_rendered_once_and_any_change_renders_anew(tiny: LlamaBackend) -> None:
    # A request is rendered and counted several times before it runs; the backend remembers
    # the last few renders, keyed by everything that changes the prompt.
    import dataclasses

    from nemotron_ros.engine.types import ToolCall

    base = GenerationRequest(messages=chat('Go to the kitchen.'), tools=TOOLS.names)
    first = tiny.render(base)
    assert tiny.render(dataclasses.replace(base, messages=list(base.messages))) is first

    def step(target: str) -> GenerationRequest:
        call = ToolCall('c1', 'navigate_to', {'target': target})
        return dataclasses.replace(base, messages=[
            *base.messages, Message('assistant', '', (call,)), Message('tool', 'arrived')])

    kitchen, garage = tiny.render(step('kitchen')), tiny.render(step('garage'))
    assert 'kitchen' in kitchen.text.split('Go to the kitchen.')[1]
    assert 'garage' in garage.text and 'garage' not in kitchen.text
    assert tiny.render(dataclasses.replace(base, enable_thinking=True)).text != first.text
    assert tiny.render(dataclasses.replace(base, offered_tools=['say'])).prefix != first.prefix
    # A reload makes a new prompt format: nothing remembered for the old one is given out.
    loaded = tiny.prompt_format
    tiny.prompt_format = type(loaded)()
    try:
        assert tiny.render(base) is not first and tiny.render(base) == first
    finally:
        tiny.prompt_format = loaded


def test_constrained_calls_always_parse_and_validate_over_200_seeds(tiny: LlamaBackend) -> None:
    assert_constrained_calls_valid_over_200_seeds(tiny)


def test_smollm2_goes_to_the_kitchen() -> None:
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(f'SmolLM2 GGUF not installed: {exc}')
    backend = LlamaBackend(LlamaConfig(model_path=str(path), n_ctx=4096, n_threads=1), TOOLS)
    backend.load()
    try:
        result = backend.generate(GenerationRequest(
            messages=chat('Go to the kitchen'),
            tools=['navigate_to', 'say', 'stop', 'get_battery'],
            tool_choice=ToolChoice.REQUIRED, max_tool_calls=1,
            sampling=SamplingParams(max_tokens=64)))
    finally:
        backend.unload()
    assert result.finish_reason is FinishReason.STOP, result.raw_text
    assert [c.name for c in result.tool_calls] == ['navigate_to'], result.raw_text
    assert result.tool_calls[0].arguments['target'] == 'kitchen'


def test_long_generation_returns_by_its_deadline(tiny: LlamaBackend) -> None:
    budget = 0.3
    start = time.monotonic()
    result = tiny.generate(GenerationRequest(
        messages=chat('Tell me a long story.'), constrained=False,
        sampling=SamplingParams(max_tokens=100_000, ignore_eos=True),
        deadline=start + budget))
    elapsed = time.monotonic() - start
    assert result.finish_reason is FinishReason.DEADLINE
    assert result.usage.completion_tokens > 10
    assert elapsed < budget + 0.5, f'returned {elapsed - budget:.3f} s after the deadline'


@pytest.fixture(scope='module')
def mid(model_dir: Path):
    path = tiny_nemotron_h_path(model_dir, **MID_PRESET)
    backend = LlamaBackend(LlamaConfig(model_path=str(path), n_ctx=8192, n_threads=1,
                                       prefix_cache=False), TOOLS)
    backend.load()
    yield backend
    backend.unload()


def test_long_prefill_is_interrupted_by_the_deadline(mid: LlamaBackend) -> None:
    long_text = ' '.join(f'observation {i}: the corridor is clear.' for i in range(250))
    request = GenerationRequest(messages=chat(long_text), constrained=False,
                                sampling=SamplingParams(max_tokens=4))
    assert mid.count_tokens(long_text) > 4000
    start = time.monotonic()
    request.deadline = start + 0.15
    result = mid.generate(request)
    interrupted = time.monotonic() - start
    assert result.finish_reason is FinishReason.DEADLINE
    assert result.usage.completion_tokens == 0
    request.deadline = None
    start = time.monotonic()
    full = mid.generate(request)
    uninterrupted = time.monotonic() - start
    # Without a deadline the answer ends by itself: a random-weight model may stop or fill
    # max_tokens, and either shows the prompt was evaluated in full.
    assert full.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert interrupted < uninterrupted / 2, (interrupted, uninterrupted)


@pytest.mark.slow
def test_prefill_abort_is_native_and_holds_with_a_busy_python_thread(mid: LlamaBackend) -> None:
    # llama.cpp polls the abort callback once per graph node; ours is C reading a flag byte
    # (src/abort_flag.c), so a busy Python thread cannot slow prefill down by holding the GIL.
    # The watchdog that sets the byte still gets the GIL often enough to stop on time.
    assert mid._llm.native_abort, 'libnemotron_ros_native.so missing: build with colcon'
    long_text = ' '.join(f'observation {i}: the corridor is clear.' for i in range(250))
    stop = threading.Event()

    def busy() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    spinner = threading.Thread(target=busy, daemon=True)
    spinner.start()
    try:
        token = CancelToken()
        timer = threading.Timer(0.1, token.cancel)
        timer.start()
        cancelled = mid.generate(GenerationRequest(
            messages=chat(long_text), constrained=False, cancel=token,
            sampling=SamplingParams(max_tokens=4)))
        timer.join()
        late = mid.generate(GenerationRequest(
            messages=chat(long_text), constrained=False,
            sampling=SamplingParams(max_tokens=4), deadline=time.monotonic() + 0.15))
    finally:
        stop.set()
        spinner.join()
    # Both stopped before a quarter of the prompt could have been evaluated.
    quarter = mid.generate(GenerationRequest(
        messages=chat(long_text[:len(long_text) // 4]), constrained=False,
        sampling=SamplingParams(max_tokens=1)))
    assert cancelled.finish_reason is FinishReason.CANCELLED
    assert late.finish_reason is FinishReason.DEADLINE
    assert cancelled.usage.completion_tokens == late.usage.completion_tokens == 0
    assert max(cancelled.usage.prefill_s, late.usage.prefill_s) < quarter.usage.prefill_s


def test_cancel_from_another_thread(tiny: LlamaBackend) -> None:
    token = CancelToken()
    timer = threading.Timer(0.2, token.cancel)
    start = time.monotonic()
    timer.start()
    result = tiny.generate(GenerationRequest(
        messages=chat('Count forever.'), constrained=False, cancel=token,
        sampling=SamplingParams(max_tokens=100_000, ignore_eos=True)))
    elapsed = time.monotonic() - start
    timer.join()
    assert result.finish_reason is FinishReason.CANCELLED
    assert result.tool_calls == []
    assert 0.2 <= elapsed < 2.0


def test_prefix_snapshot_gives_identical_greedy_output(model_dir: Path) -> None:
    path = str(tiny_nemotron_h_path(model_dir))
    outputs = {}
    reused = {}
    for cached in (True, False):
        backend = LlamaBackend(LlamaConfig(model_path=path, n_ctx=8192, n_threads=1,
                                           prefix_cache=cached), TOOLS)
        backend.load()
        try:
            results = [backend.generate(GenerationRequest(
                messages=chat(text), tools=TOOLS.names,
                sampling=SamplingParams(max_tokens=48)))
                for text in ('Go to the kitchen.', 'Pick up the red cup.', 'Stop!')]
        finally:
            backend.unload()
        outputs[cached] = [r.raw_text for r in results]
        reused[cached] = [r.usage.prompt_tokens_reused for r in results]
        prompt_tokens = results[1].usage.prompt_tokens
    assert outputs[True] == outputs[False]
    assert reused[False] == [0, 0, 0]
    assert reused[True][0] == 0
    assert reused[True][1] == reused[True][2] > prompt_tokens // 2


class _GrammarFirst:
    """The former sampler: the grammar masks the whole vocabulary, then greedy picks."""

    def __init__(self, params: SamplingParams, grammar: object, n_vocab: int,
                 eog_tokens: object = (), index: object = None) -> None:
        import llama_cpp

        assert params.temperature == 0.0 and grammar is not None
        self.chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(self.chain, grammar)
        llama_cpp.llama_sampler_chain_add(self.chain, llama_cpp.llama_sampler_init_greedy())

    def sample(self, ctx: object) -> int:
        import llama_cpp

        return llama_cpp.llama_sampler_sample(self.chain, ctx, -1)

    def __enter__(self) -> _GrammarFirst:
        return self

    def __exit__(self, *exc: object) -> None:
        import llama_cpp

        llama_cpp.llama_sampler_free(self.chain)


@pytest.mark.parametrize('pair_min_tokens', [None, 0])
@pytest.mark.parametrize('masked_draw', ['native', 'python'])
def test_verified_draws_give_the_grammar_first_greedy_output(
        tiny: LlamaBackend, monkeypatch: pytest.MonkeyPatch, pair_min_tokens,
        masked_draw: str) -> None:
    # Random weights disagree with the grammar at almost every token, end-of-generation
    # included, so this exercises the rejected-draw path (and its first-byte pre-filter) hard;
    # 0 makes the filter probe two-byte tokens too, which the tiny vocabulary never needs.
    # 'python' is the fallback used when the C library is missing.
    from nemotron_ros.engine.backends.llama import backend as backend_module
    from nemotron_ros.engine.backends.llama import native
    from nemotron_ros.engine.backends.llama.sampler import FirstByteIndex

    if pair_min_tokens is not None:
        monkeypatch.setattr(FirstByteIndex, 'PAIR_MIN_TOKENS', pair_min_tokens)
    if masked_draw == 'python':
        monkeypatch.setattr(native, 'library', lambda: None)
    else:
        assert native.library() is not None, f'{native.LIBRARY} missing: build with colcon'

    requests = [GenerationRequest(messages=chat(text), tools=TOOLS.names,
                                  tool_choice=choice, sampling=SamplingParams(max_tokens=48))
                for text in ('Go to the kitchen.', 'Say hello.', 'Look at the door.')
                for choice in (ToolChoice.AUTO, ToolChoice.REQUIRED)]
    verified = [tiny.generate(r).raw_text for r in requests]
    monkeypatch.setattr(backend_module, 'SamplerChain', _GrammarFirst)
    reference = [tiny.generate(r).raw_text for r in requests]
    assert verified == reference
    assert any('<tool_call>' in text for text in verified)


def _restart(path: str, cache_dir: Path, text: str = 'Go to the kitchen.') -> tuple:
    """Load a fresh backend with a state cache, run one greedy request; (result, backend)."""
    backend = LlamaBackend(LlamaConfig(model_path=path, n_ctx=8192, n_threads=1,
                                       state_cache_dir=str(cache_dir)), TOOLS)
    backend.load()
    try:
        return backend.generate(GenerationRequest(
            messages=chat(text), tools=TOOLS.names, sampling=SamplingParams(max_tokens=24)))
    finally:
        backend.unload()


def test_prefix_state_survives_a_restart(model_dir: Path, tmp_path: Path) -> None:
    path = str(tiny_nemotron_h_path(model_dir))
    cold = _restart(path, tmp_path)
    assert cold.usage.prompt_tokens_reused == 0
    assert len(list(tmp_path.glob('*.state'))) == len(list(tmp_path.glob('*.json'))) == 1
    warm = _restart(path, tmp_path)
    assert warm.usage.prompt_tokens_reused > warm.usage.prompt_tokens // 2
    assert warm.raw_text == cold.raw_text
    other = _restart(path, tmp_path, 'Stop!')  # same prefix, another request
    assert other.usage.prompt_tokens_reused == warm.usage.prompt_tokens_reused


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'metadata', 'foreign'])
def test_a_bad_prefix_state_file_is_ignored_with_a_log_line(
        model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    path = str(tiny_nemotron_h_path(model_dir))
    cold = _restart(path, tmp_path)
    state = next(tmp_path.glob('*.state'))
    meta = state.with_name(state.name[:-len('.state')] + '.json')
    data = bytearray(state.read_bytes())
    if damage == 'flip':
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif damage == 'truncate':
        state.write_bytes(bytes(data[:len(data) // 3]))
    elif damage == 'metadata':
        meta.write_text('{not json')
    else:  # a state saved for another prompt, under this prompt's name
        record = json.loads(meta.read_text())
        record['key']['tokens_sha256'] = '0' * 64
        meta.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        again = _restart(path, tmp_path)
    assert again.usage.prompt_tokens_reused == 0, 'evaluated, not restored'
    assert again.raw_text == cold.raw_text
    assert any('prefix state cache' in r.getMessage() for r in caplog.records)
    assert _restart(path, tmp_path).usage.prompt_tokens_reused > 0, 'saved afresh'


def test_constrained_calls_with_repeat_penalty_stay_valid(tiny: LlamaBackend) -> None:
    # Penalties remember accepted tokens, so this chain draws from its own candidate array
    # and only the verified token is accepted: the calls still parse and validate.
    returned = 0
    for seed in range(12):
        result = tiny.generate(GenerationRequest(
            messages=chat('Bring the red cup to the table.'), tools=TOOLS.names,
            tool_choice=ToolChoice.REQUIRED, sampling=SamplingParams(
                temperature=0.8, repeat_penalty=1.3, seed=seed, max_tokens=160)))
        if result.finish_reason is FinishReason.STOP:
            assert result.tool_calls or result.rejected, result.raw_text
            assert not [r for r in result.rejected if 'parse' in r], result.rejected
            for call in result.tool_calls:
                assert TOOLS.validate_call(call.name, call.arguments) == []
            returned += len(result.tool_calls)
        else:
            assert result.tool_calls == []
    assert returned >= 3


def test_prefix_is_rebuilt_when_the_tools_change(tiny: LlamaBackend) -> None:
    def run(tools: list[str]) -> int:
        return tiny.generate(GenerationRequest(
            messages=chat('hello'), tools=tools,
            sampling=SamplingParams(max_tokens=4))).usage.prompt_tokens_reused

    run(['say'])
    assert run(['say']) > 0
    assert run(['say', 'stop']) == 0
    assert run(['say', 'stop']) > 0


def test_prompt_longer_than_the_context_is_a_request_error(model_dir: Path) -> None:
    backend = LlamaBackend(LlamaConfig(model_path=str(tiny_nemotron_h_path(model_dir)),
                                       n_ctx=256, n_batch=128, n_threads=1), TOOLS)
    backend.load()
    try:
        with pytest.raises(RequestError, match='context holds 256'):
            backend.generate(GenerationRequest(messages=chat('x ' * 400)))
        ok = backend.generate(GenerationRequest(messages=chat('hi'),
                                                sampling=SamplingParams(max_tokens=4)))
        assert ok.usage.prompt_tokens < 256
    finally:
        backend.unload()


@pytest.mark.parametrize('content, message', [
    (None, 'not found'),
    (b'not a model at all', 'not a GGUF file'),
    (b'GGUF' + os.urandom(64), 'could not load'),
])
def test_missing_or_corrupt_model_gives_a_clear_error(tmp_path: Path, content, message) -> None:
    path = tmp_path / 'model.gguf'
    if content is not None:
        path.write_bytes(content)
    backend = LlamaBackend(LlamaConfig(model_path=str(path)), TOOLS)
    with pytest.raises(BackendError, match=message) as info:
        backend.load()
    assert str(path) in str(info.value)
    assert not backend.loaded


def test_a_canceled_load_stops_while_reading_the_model(model_dir: Path) -> None:
    path = str(tiny_nemotron_h_path(model_dir))
    cancel = CancelToken()
    cancel.cancel()
    backend = LlamaBackend(LlamaConfig(model_path=path, n_threads=1), TOOLS)
    with pytest.raises(BackendError, match='aborted') as info:
        backend.load(cancel)
    assert path in str(info.value) and not backend.loaded
    assert backend.load(CancelToken()).path == path  # a later load is unaffected
    backend.unload()


def test_whole_prompt_count_matches_what_generate_evaluates(tiny: LlamaBackend) -> None:
    history = [Message('assistant', '', ()), Message('tool', '{"percent": 70}')]
    request = GenerationRequest(messages=[*chat('Check the battery'), *history],
                                tools=TOOLS.names, sampling=SamplingParams(max_tokens=2))
    counted = tiny.count_prompt_tokens(request)
    result = tiny.generate(request)
    assert counted == result.usage.prompt_tokens


def test_common_prefix_length_matches_a_plain_scan() -> None:
    import random

    from nemotron_ros.engine.backends.llama.backend import common_prefix_length

    def scan(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    rng = random.Random(3)
    for _ in range(2000):
        a = [rng.randrange(3) for _ in range(rng.randrange(40))]
        b = a[:rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(8))]
        assert common_prefix_length(a, b) == common_prefix_length(b, a) == scan(a, b), (a, b)


def _last_logits(backend: LlamaBackend):
    import llama_cpp
    import numpy as np

    llm = backend._llm
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab,)).copy()


@pytest.mark.parametrize('model', ['tiny', 'smollm2'])
def test_a_prompt_that_extends_the_last_generation_continues_its_state(
        model_dir: Path, model: str) -> None:
    # What a task's next step does: its prompt is the last step's prompt, the answer and the
    # new turns. Here token for token (the answer's own tokens), so that the recurrent model
    # may continue too. The logits must be those of the same prompt started from the fixed
    # prefix, the path every request took before (evaluating in other pieces, as a backend
    # without prefix_cache does, moves SmolLM2's logits by up to 0.6 of 26 either way).
    from nemotron_ros.engine.types import Usage

    path = str(tiny_nemotron_h_path(model_dir) if model == 'tiny' else smollm2_gguf_path())
    backend = LlamaBackend(LlamaConfig(model_path=path, n_ctx=4096, n_threads=1,
                                       state_cache_dir=''), TOOLS)
    backend.load()
    try:
        first = backend.generate(GenerationRequest(
            messages=chat('Go to the kitchen.'), tools=TOOLS.names,
            sampling=SamplingParams(max_tokens=12)))
        held = list(backend._work_tokens)
        prefix = backend._prefix_tokens
        # The prompt and every answer token but one cut by max_tokens (its logits are unused).
        assert len(held) == first.usage.prompt_tokens + first.usage.completion_tokens - (
            first.finish_reason is FinishReason.LENGTH)
        extra = backend._llm.tokenize('\nThe robot reached the kitchen.')

        def prefill(tokens: list[int], from_prefix: bool = False) -> int:
            if from_prefix:
                backend._work_tokens = []
            usage = Usage(prompt_tokens=len(tokens))
            backend._prefill(backend._llm, prefix, tokens[len(prefix):], usage, lambda: False,
                             continues=True)
            return usage.prompt_tokens_reused

        def continued_matches_fresh_start(tokens: list[int], reused: int) -> None:
            assert prefill(tokens) == reused
            continued = _last_logits(backend)
            assert prefill(tokens, from_prefix=True) == len(prefix)
            reference = _last_logits(backend)
            assert abs(continued - reference).max() <= 1e-3 * max(1.0, abs(reference).max())

        continued_matches_fresh_start(held + extra, len(held))  # only the new tokens evaluated
        # A prompt that leaves the held state part-way: a transformer drops the rest and keeps
        # the common start; a recurrent state cannot be rolled back, so it starts from the
        # fixed prefix.
        prefill(held, from_prefix=True)
        branch = held[:len(held) - 4] + extra
        continued_matches_fresh_start(
            branch, len(prefix) if backend.info.recurrent else len(held) - 4)
    finally:
        backend.unload()


def test_only_a_continued_conversation_continues_the_state() -> None:
    # A task's next step (the same messages, the answer, a tool result) keeps what the last
    # generation left; the same request again, or another one, starts from the fixed prefix,
    # so an answer never depends on what ran before it.
    from nemotron_ros.engine.types import ToolCall

    backend = LlamaBackend(LlamaConfig(model_path=str(smollm2_gguf_path()), n_ctx=4096,
                                       n_threads=1, state_cache_dir=''), TOOLS)
    backend.load()
    try:
        def run(messages: list[Message]):
            request = GenerationRequest(messages=messages, tools=['navigate_to', 'get_battery'],
                                        tool_choice=ToolChoice.REQUIRED, max_tool_calls=1,
                                        sampling=SamplingParams(max_tokens=48))
            counted = backend.count_new_tokens(request)
            usage = backend.generate(request).usage
            assert counted == usage.prompt_tokens - usage.prompt_tokens_reused, 'admission'
            return usage

        run(chat('Say hello.'))  # evaluates the fixed prefix and keeps its state
        fixed = run(chat('Check the battery.')).prompt_tokens_reused
        assert fixed > 0
        assert run(chat('Check the battery.')).prompt_tokens_reused == fixed
        step = chat('Check the battery.') + [
            Message('assistant', '', (ToolCall('call_0', 'get_battery', {}),)),
            Message('tool', '{"name": "get_battery", "success": true, "content": 73}')]
        again = run(chat('Check the battery.'))
        continued = run(step)
        # At least the whole last prompt (its answer too, up to where the rendered call
        # differs from the generated one).
        assert continued.prompt_tokens_reused >= again.prompt_tokens > fixed
        assert run(chat('Go to the kitchen.')).prompt_tokens_reused == fixed
    finally:
        backend.unload()
