"""Grammar: compiles in llama.cpp and admits exactly the outputs it should, without a model.

llama.cpp compiles a grammar only against a vocabulary, so these tests write a vocab-only
GGUF (256 byte tokens plus Nemotron's special tokens as control tokens) and drive llama.cpp's
own grammar sampler with it: each token of a hand-written output must keep a finite logit,
and at the end the end-of-generation token must be allowed.
"""

from __future__ import annotations

import ctypes
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from nemotron_ros.engine.grammar import MAX_CALLS, build_grammar
from nemotron_ros.engine.tools import ToolRegistry
from nemotron_ros.engine.types import ToolChoice

llama_cpp = pytest.importorskip('llama_cpp', reason='llama-cpp-python is not installed')
gguf = pytest.importorskip('gguf', reason='the gguf package is needed to write a test vocab')

from nemotron_ros.engine.backends.llama import native  # noqa: E402  (llama_cpp)
from nemotron_ros.engine.backends.llama.sampler import (  # noqa: E402
    _TOKEN_DATA,
    FirstByteIndex,
)

EXAMPLE = Path(__file__).resolve().parents[1] / 'config' / 'tools.example.yaml'
SPECIAL = ('<|im_start|>', '<|im_end|>', '<think>', '</think>', '<tool_call>', '</tool_call>')
FIRST_SPECIAL = 257  # 256 byte tokens, one merged token, then the special tokens
EOS = FIRST_SPECIAL + SPECIAL.index('<|im_end|>')

Accepts = Callable[[str, str], bool]


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: the text of each byte token in a byte-level BPE."""
    printable = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    return [chr(mapping[b]) for b in range(256)]


def _write_vocab(path: Path) -> None:
    symbols = _byte_symbols()
    writer = gguf.GGUFWriter(str(path), 'llama')
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model('gpt2')
    writer.add_tokenizer_pre('gpt-2')
    writer.add_token_list([*symbols, symbols[ord('a')] + symbols[ord('b')], *SPECIAL])
    writer.add_token_types([gguf.TokenType.NORMAL] * FIRST_SPECIAL
                           + [gguf.TokenType.CONTROL] * len(SPECIAL))
    writer.add_token_merges([f"{symbols[ord('a')]} {symbols[ord('b')]}"])
    writer.add_bos_token_id(FIRST_SPECIAL)
    writer.add_eos_token_id(EOS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tokens(text: str) -> list[int]:
    """Special tokens as single tokens, everything else byte by byte."""
    out = []
    position = 0
    while position < len(text):
        special = next((s for s in SPECIAL if text.startswith(s, position)), None)
        if special:
            out.append(FIRST_SPECIAL + SPECIAL.index(special))
            position += len(special)
        else:
            out.extend(text[position].encode('utf-8'))
            position += 1
    return out


@pytest.fixture(scope='module')
def vocab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    path = tmp_path_factory.mktemp('vocab') / 'vocab.gguf'
    _write_vocab(path)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, 'the vocab-only test model did not load'
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


def compile_grammar(vocab: object, grammar: str) -> object:
    return llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b'root')


@pytest.fixture(scope='module')
def accepts(vocab: object) -> Accepts:
    """accepts(grammar, text): llama.cpp's grammar sampler admits text and then end of output."""

    def allowed(sampler: object, token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
        array = llama_cpp.llama_token_data_array(data, 1, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
        return math.isfinite(data[0].logit)

    def check(grammar: str, text: str) -> bool:
        sampler = compile_grammar(vocab, grammar)
        assert sampler, f'grammar does not compile:\n{grammar}'
        try:
            for token in _tokens(text):
                if not allowed(sampler, token):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return allowed(sampler, EOS)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    return check


@pytest.fixture(scope='module')
def registry() -> ToolRegistry:
    return ToolRegistry.from_yaml(EXAMPLE)


def call(name: str, **arguments: str) -> str:
    params = ''.join(f'<parameter={k}>\n{v}\n</parameter>\n' for k, v in arguments.items())
    return f'<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>'


NAV = call('navigate_to', target='kitchen')

VALID_AUTO = [
    'Hello there.',
    '\nSure, I can do that.\nAnything else?',
    'Quotes "are" fine & so is 100% unicode: café ✓',
    NAV,
    f'\n{NAV}',
    f'\n\n{NAV}\n',
    call('navigate_to', target='charging_dock', speed='0.45'),
    call('navigate_to', target='table', speed='0.5'),
    call('pick', object_name='red_cup'),
    call('pick', object_name='red cup #2', grasp='side'),
    call('place', location='shelf'),
    call('say', text='He said "hi" & left: {ok} [1]'),
    call('say', text='x' * 200),
    call('stop'),
    call('get_battery'),
    call('move_base', linear='-0.3', angular='0.25', duration='2'),
    call('move_base', linear='0', angular='-1', duration='5'),
    call('look_at', point='{"x":1.5,"y":-2,"z":0.25}'),
    call('set_waypoints', places='["kitchen","table","entrance"]'),
    call('set_waypoints', places='["kitchen"]', loop='true'),
    f'{NAV}\n{call("say", text="On my way")}',
    '\n'.join([call('stop')] * MAX_CALLS),
]

INVALID_AUTO = [
    '',
    '  \n',
    'a < b',
    'bell\x07',
    call('fly', height='3'),
    call('navigate_to'),
    call('navigate_to', target='garage'),
    call('navigate_to', target='Kitchen'),
    call('navigate_to', speed='0.4', target='kitchen'),
    call('navigate_to', target='kitchen', colour='red'),
    call('navigate_to', target='kitchen', speed='1e-1'),
    call('navigate_to', target='kitchen', speed='.5'),
    call('navigate_to', target='kitchen', speed='0.1234567'),
    call('navigate_to', target='kitchen', speed='NaN'),
    call('pick', object_name=''),
    call('pick', object_name='x' * 65),
    call('say', text='x' * 201),
    call('say', text='a <b> tag'),
    call('say', text='tab\there'),
    call('say', text='two\nlines'),
    call('move_base', linear='-0.3', angular='1.25'),
    call('move_base', linear='00', angular='0', duration='1'),
    call('move_base', linear='0', angular='0', duration='100'),
    call('move_base', linear='0', angular='0', duration='10.5'),
    call('move_base', linear='0', angular='0', duration='-1'),
    call('look_at', point='{"x": 1.5, "y": -2, "z": 0.25}'),
    call('look_at', point='{"x":1.5,"z":0.25}'),
    call('look_at', point='{"y":1,"x":1.5,"z":0.25}'),
    call('look_at', point='{"x":1,"y":1,"z":1,"w":1}'),
    call('set_waypoints', places='[]'),
    call('set_waypoints', places='["kitchen","table","entrance","table","kitchen","table"]'),
    call('set_waypoints', places='[kitchen]'),
    call('set_waypoints', places='["kitchen"]', loop='True'),
    NAV[:-len('</tool_call>')],
    NAV.replace('\n<function', '<function'),
    NAV.replace('</parameter>\n</function>', '</parameter></function>'),
    f'{NAV}\n\n{NAV}',
    f'{NAV} trailing words',
    f'Let me call it. {NAV}',
    '\n'.join([call('stop')] * (MAX_CALLS + 1)),
]


@pytest.mark.parametrize('choice', list(ToolChoice))
@pytest.mark.parametrize('thinking', [False, True])
def test_compiles_in_llama_cpp(vocab: object, registry: ToolRegistry, choice: ToolChoice,
                               thinking: bool) -> None:
    grammar = build_grammar(list(registry), choice, thinking)
    sampler = compile_grammar(vocab, grammar)
    assert sampler, grammar
    llama_cpp.llama_sampler_free(sampler)


def test_broken_grammar_is_refused_by_the_check(vocab: object) -> None:
    assert not compile_grammar(vocab, 'root ::= undefined-rule')


@pytest.mark.parametrize('text', VALID_AUTO)
def test_auto_accepts(accepts: Accepts, registry: ToolRegistry, text: str) -> None:
    assert accepts(build_grammar(list(registry), ToolChoice.AUTO), text)


@pytest.mark.parametrize('text', INVALID_AUTO)
def test_auto_rejects(accepts: Accepts, registry: ToolRegistry, text: str) -> None:
    assert not accepts(build_grammar(list(registry), ToolChoice.AUTO), text)


def test_required_admits_calls_only(accepts: Accepts, registry: ToolRegistry) -> None:
    grammar = build_grammar(list(registry), ToolChoice.REQUIRED)
    assert accepts(grammar, NAV)
    assert not accepts(grammar, 'Hello there.')


def test_none_admits_reply_only(accepts: Accepts, registry: ToolRegistry) -> None:
    grammar = build_grammar(list(registry), ToolChoice.NONE)
    assert accepts(grammar, 'Hello there.')
    assert not accepts(grammar, NAV)
    assert 'tool_call' not in grammar


def test_only_offered_tools_can_be_called(accepts: Accepts, registry: ToolRegistry) -> None:
    grammar = build_grammar(registry.subset(['say', 'stop']), ToolChoice.AUTO)
    assert accepts(grammar, call('stop'))
    assert not accepts(grammar, NAV)


@pytest.mark.parametrize('text, ok', [
    ('I should drive to the kitchen.\n</think>\n' + NAV, True),
    ('</think>' + NAV, True),
    ('Short.\n</think>\n\nHello!', True),
    ('Step 1\tthen\nstep 2\n</think>\nDone.', True),
    (NAV, False),
    ('No closing tag, then ' + NAV, False),
    ('a <b> c\n</think>\nHi', False),
    ('Thinking...\n</think>\n', False),
    ('x\n</think>\n</think>\nHi', False),
])
def test_thinking(accepts: Accepts, registry: ToolRegistry, text: str, ok: bool) -> None:
    assert accepts(build_grammar(list(registry), ToolChoice.AUTO, thinking=True), text) is ok


NESTED = ToolRegistry.from_dict({'tools': [{
    'name': 'configure',
    'description': 'Nested values.',
    'parameters': {
        'type': 'object',
        'properties': {
            'count': {'type': 'integer', 'minimum': 0, 'maximum': 500},
            'offset': {'type': 'integer'},
            'options': {
                'type': 'object',
                'properties': {
                    'label': {'type': 'string', 'maxLength': 5},
                    'mode': {'type': 'string', 'enum': ['fast', 'safe']},
                    'gains': {'type': 'array', 'items': {'type': 'number'}, 'maxItems': 3},
                    'on': {'type': 'boolean'},
                },
                'required': ['mode'],
            },
        },
        'required': ['count'],
    },
}]})


@pytest.mark.parametrize('arguments, ok', [
    ({'count': '0'}, True),
    ({'count': '500'}, True),
    ({'count': '5000'}, False),
    ({'count': '1.5'}, False),
    ({'count': '-1'}, False),
    ({'count': '7', 'offset': '-123456'}, True),
    ({'count': '7', 'offset': '1234567'}, False),
    ({'count': '1', 'options': '{"mode":"fast"}'}, True),
    ({'count': '1', 'options': '{"label":"a\\"b","mode":"safe","on":false}'}, True),
    ({'count': '1', 'options': '{"label":"abcdef","mode":"safe"}'}, False),
    ({'count': '1', 'options': '{"label":"a\nb","mode":"safe"}'}, False),
    ({'count': '1', 'options': '{"label":"a\\u0000","mode":"safe"}'}, False),
    ({'count': '1', 'options': '{"mode":"safe","gains":[]}'}, True),
    ({'count': '1', 'options': '{"mode":"safe","gains":[0.5,-1,2.25]}'}, True),
    ({'count': '1', 'options': '{"mode":"safe","gains":[1,2,3,4]}'}, False),
    ({'count': '1', 'options': '{"label":"x"}'}, False),
    ({'count': '1', 'options': '{}'}, False),
    ({'count': '1', 'options': '{"mode":"safe",}'}, False),
])
def test_nested_values(accepts: Accepts, arguments: dict, ok: bool) -> None:
    grammar = build_grammar(list(NESTED), ToolChoice.REQUIRED)
    assert accepts(grammar, call('configure', **arguments)) is ok


def test_required_without_tools_is_an_error() -> None:
    with pytest.raises(ValueError, match="'required' needs at least one tool"):
        build_grammar([], ToolChoice.REQUIRED)


def test_deterministic_and_cached(registry: ToolRegistry) -> None:
    first = build_grammar(list(registry), ToolChoice.AUTO, True)
    again = build_grammar(list(ToolRegistry.from_yaml(EXAMPLE)), ToolChoice.AUTO, True)
    assert first == again
    assert first is again  # equal tool specs hit the cache
    assert build_grammar(list(registry), ToolChoice.AUTO, False) != first


def test_rule_names_are_valid_gbnf(registry: ToolRegistry) -> None:
    grammar = build_grammar(list(registry) + list(NESTED), ToolChoice.AUTO, True)
    for line in grammar.splitlines():
        assert re.match(r'^[a-zA-Z0-9-]+ ::= ', line), line


RANGES = [(0, 500), (1, 100), (-20, -3), (-1, 1), (7, 7), (95, 1005)]


@pytest.mark.parametrize('low, high', RANGES)
def test_integer_bounds_are_exact(accepts: Accepts, low: int, high: int) -> None:
    tool = {'name': 'set', 'description': 'Set a value.',
            'parameters': {'type': 'object', 'required': ['n'], 'properties': {
                'n': {'type': 'integer', 'minimum': low, 'maximum': high}}}}
    grammar = build_grammar(list(ToolRegistry.from_dict({'tools': [tool]})), ToolChoice.REQUIRED)
    probes = {*range(low - 12, low + 12), *range(high - 12, high + 12), 0, 10 * high + 1}
    for value in sorted(probes):
        assert accepts(grammar, call('set', n=str(value))) is (low <= value <= high), value


@pytest.mark.parametrize('low, high, text, ok', [
    (-1, 1, '1', True), (-1, 1, '1.0', True), (-1, 1, '1.000000', True),
    (-1, 1, '0.999999', True), (-1, 1, '-1', True), (-1, 1, '-0.25', True), (-1, 1, '0', True),
    (-1, 1, '1.5', False), (-1, 1, '1.000001', False), (-1, 1, '2', False),
    (-1, 1, '-1.2', False), (-1, 1, '1.0000000', False),
    (1.25, 3.75, '1.25', True), (1.25, 3.75, '1.3', True), (1.25, 3.75, '2', True),
    (1.25, 3.75, '3.7', True), (1.25, 3.75, '3.75', True), (1.25, 3.75, '3.750', True),
    (1.25, 3.75, '1.2', False), (1.25, 3.75, '1.249999', False), (1.25, 3.75, '1', False),
    (1.25, 3.75, '3.76', False), (1.25, 3.75, '3.750001', False), (1.25, 3.75, '4', False),
    (-0.3, -0.1, '-0.2', True), (-0.3, -0.1, '-0.3', True), (-0.3, -0.1, '-0.1', True),
    (-0.3, -0.1, '-0.05', False), (-0.3, -0.1, '-0.31', False), (-0.3, -0.1, '0.2', False),
])
def test_number_bounds_are_exact(accepts: Accepts, low: float, high: float, text: str,
                                 ok: bool) -> None:
    tool = {'name': 'set', 'description': 'Set a value.',
            'parameters': {'type': 'object', 'required': ['x'], 'properties': {
                'x': {'type': 'number', 'minimum': low, 'maximum': high}}}}
    grammar = build_grammar(list(ToolRegistry.from_dict({'tools': [tool]})), ToolChoice.REQUIRED)
    assert accepts(grammar, call('set', x=text)) is ok


@pytest.mark.parametrize('tool, arguments, ok', [
    ('navigate_to', {'target': 'table', 'speed': '0.5'}, True),
    ('navigate_to', {'target': 'table', 'speed': '0.1'}, True),
    ('navigate_to', {'target': 'table', 'speed': '0.55'}, False),
    ('navigate_to', {'target': 'table', 'speed': '0.05'}, False),
    ('move_base', {'linear': '-0.3', 'angular': '-1', 'duration': '5'}, True),
    ('move_base', {'linear': '-0.4', 'angular': '0', 'duration': '1'}, False),
    ('move_base', {'linear': '0', 'angular': '1.5', 'duration': '1'}, False),
    ('move_base', {'linear': '0', 'angular': '0', 'duration': '6'}, False),
    ('look_at', {'point': '{"x":4.5,"y":-9,"z":2}'}, True),
    ('look_at', {'point': '{"x":-1,"y":0,"z":1}'}, False),
])
def test_limits_are_folded_into_the_grammar(accepts: Accepts, registry: ToolRegistry,
                                            tool: str, arguments: dict, ok: bool) -> None:
    grammar = build_grammar(registry.subset([tool]), ToolChoice.REQUIRED)
    assert accepts(grammar, call(tool, **arguments)) is ok


def test_verified_sampler_governs_end_of_generation(vocab: object) -> None:
    # The engine's sampler checks each drawn token with the grammar: end of generation is
    # refused until the grammar is complete, and then allowed.
    from nemotron_ros.engine.backends.llama.sampler import SamplerChain
    from nemotron_ros.engine.types import SamplingParams

    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    with SamplerChain(SamplingParams(), compile_grammar(vocab, 'root ::= "ab" "c"'),
                      n_vocab, [EOS]) as chain:
        assert not chain.allows(EOS)
        assert not chain.allows(ord('c'))
        for token in _tokens('abc'):
            assert chain.allows(token)
            llama_cpp.llama_sampler_accept(chain.grammar, token)
        assert chain.allows(EOS)
        assert not chain.allows(ord('a'))


@pytest.mark.parametrize('pair_min_tokens', [FirstByteIndex.PAIR_MIN_TOKENS, 0])
@pytest.mark.parametrize('text', [VALID_AUTO[0], VALID_AUTO[-1]])
def test_first_byte_filter_keeps_every_allowed_token(
        vocab: object, registry: ToolRegistry, text: str, pair_min_tokens: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The filter may only drop tokens the grammar rejects: at every step of a valid output,
    # each token the full mask allows is among the filter's candidates (0: always probe the
    # two-byte tokens too). The C walk that the engine uses must find the same tokens in the
    # same order.
    monkeypatch.setattr(FirstByteIndex, 'PAIR_MIN_TOKENS', pair_min_tokens)

    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    buf = ctypes.create_string_buffer(64)

    def piece(token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    index = FirstByteIndex(n_vocab, piece, [EOS])
    lib = native.library()
    assert lib is not None, f'{native.LIBRARY} missing: build with colcon'
    work = np.zeros(n_vocab, dtype=_TOKEN_DATA)
    ids = np.zeros(n_vocab, dtype=np.int32)

    def native_candidates(grammar: object) -> list[int]:
        n = lib.nemotron_ros_grammar_candidates(
            native.sampler_apply_address(), grammar, ctypes.pointer(index.tables),
            index.PAIR_MAX_BYTES, index.PAIR_MIN_TOKENS, work.ctypes.data, ids.ctypes.data)
        return ids[:n].tolist()

    sampler = compile_grammar(vocab, build_grammar(list(registry), ToolChoice.AUTO))
    data = (llama_cpp.llama_token_data * n_vocab)()
    try:
        for token in [*_tokens(text), None]:
            for i in range(n_vocab):
                data[i] = llama_cpp.llama_token_data(i, 0.0, 0.0)
            llama_cpp.llama_sampler_apply(
                sampler, ctypes.byref(llama_cpp.llama_token_data_array(data, n_vocab, -1, False)))
            allowed = {i for i in range(n_vocab) if math.isfinite(data[i].logit)}
            found = index.possible(
                lambda ids, allowed=allowed: [int(t) in allowed for t in ids]).tolist()
            assert native_candidates(sampler) == found  # the C walk, asking the grammar itself
            candidates = set(found)
            assert allowed <= candidates
            assert len(candidates) < n_vocab or len(allowed) > n_vocab // 2
            if token is not None:
                llama_cpp.llama_sampler_accept(sampler, token)
    finally:
        llama_cpp.llama_sampler_free(sampler)
