"""Tool-call parser: round trips, reasoning split, and no call ever from incomplete output."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from nemotron_ros.engine.tool_parser import (
    ParsedCall,
    convert_value,
    format_value,
    parse_output,
    parse_tool_calls,
    render_tool_call,
    validate_calls,
)
from nemotron_ros.engine.tools import ToolRegistry

EXAMPLE = Path(__file__).resolve().parents[1] / 'config' / 'tools.example.yaml'

EXTRA = ToolRegistry.from_dict({'tools': [{
    'name': 'configure',
    'description': 'Every value type.',
    'parameters': {
        'type': 'object',
        'properties': {
            'note': {'type': 'string'},
            'count': {'type': 'integer'},
            'gain': {'type': 'number'},
            'enabled': {'type': 'boolean'},
            'options': {
                'type': 'object',
                'properties': {
                    'label': {'type': 'string'},
                    'tags': {'type': 'array', 'items': {'type': 'string'}},
                    'inner': {'type': 'object', 'properties': {'k': {'type': 'number'}}},
                },
            },
            'points': {'type': 'array', 'items': {'type': 'array', 'items': {'type': 'number'}}},
        },
    },
}]})


@pytest.fixture(scope='module')
def registry() -> ToolRegistry:
    return ToolRegistry.from_yaml(EXAMPLE)


ROUND_TRIPS = [
    ('navigate_to', {'target': 'kitchen'}),
    ('navigate_to', {'target': 'table', 'speed': 0.25}),
    ('say', {'text': 'He said "hi", then {left} & [went] \\ away'}),
    ('say', {'text': '  padded  '}),
    ('say', {'text': ''}),
    ('stop', {}),
    ('look_at', {'point': {'x': 1.5, 'y': -2, 'z': 0.0}}),
    ('set_waypoints', {'places': ['kitchen', 'entrance'], 'loop': True}),
    ('move_base', {'linear': -0.3, 'angular': 0, 'duration': 2.5}),
]

EXTRA_ROUND_TRIPS = [
    {'note': 'line one\nline two', 'count': -7, 'gain': 1e-3, 'enabled': False},
    {'note': '\nstarts and ends with newlines\n'},
    {'options': {'label': 'quote " and \\ backslash', 'tags': ['a', 'b "c"'],
                 'inner': {'k': 2.5}}},
    {'points': [[0, 1.5], [], [-2, 3, 4]]},
    {'note': '{"looks": "like json"}', 'count': 0},
]


@pytest.mark.parametrize('name, arguments', ROUND_TRIPS)
def test_round_trip_example_tools(registry: ToolRegistry, name: str, arguments: dict) -> None:
    parsed = parse_output(render_tool_call(name, arguments), registry)
    assert parsed.errors == []
    assert parsed.calls == [ParsedCall(name, arguments)]
    assert parsed.content == ''


@pytest.mark.parametrize('arguments', EXTRA_ROUND_TRIPS)
def test_round_trip_nested_values(arguments: dict) -> None:
    parsed = parse_output(render_tool_call('configure', arguments), EXTRA)
    assert parsed.errors == []
    assert parsed.calls[0].arguments == arguments
    assert type(parsed.calls[0].arguments.get('count', 0)) is int


def test_several_calls_and_validation_ids(registry: ToolRegistry) -> None:
    text = '\n' + '\n'.join(render_tool_call(n, a) for n, a in ROUND_TRIPS[:3]) + '\n'
    calls, rejected = parse_tool_calls(text, registry)
    assert rejected == []
    assert [(c.id, c.name) for c in calls] == [
        ('call_0', 'navigate_to'), ('call_1', 'navigate_to'), ('call_2', 'say')]
    assert calls[1].arguments_json == '{"target":"table","speed":0.25}'


def test_reasoning_then_call_when_thinking(registry: ToolRegistry) -> None:
    text = 'The user wants the kitchen.\n</think>\n' + render_tool_call(*ROUND_TRIPS[0])
    parsed = parse_output(text, registry, thinking=True)
    assert parsed.reasoning == 'The user wants the kitchen.'
    assert parsed.calls == [ParsedCall('navigate_to', {'target': 'kitchen'})]
    assert parsed.errors == [] and parsed.content == ''


def test_reasoning_then_reply() -> None:
    parsed = parse_output('<think>\nhmm\n</think>\n\nHello!', thinking=False)
    assert (parsed.reasoning, parsed.content, parsed.calls) == ('hmm', 'Hello!', [])


def test_empty_reasoning_of_thinking_off_prompt() -> None:
    parsed = parse_output('<think></think>Hi there')
    assert (parsed.reasoning, parsed.content) == ('', 'Hi there')


def test_unterminated_reasoning_gives_no_call(registry: ToolRegistry) -> None:
    text = 'I will call navigate_to ' + render_tool_call(*ROUND_TRIPS[0])
    parsed = parse_output(text, registry, thinking=True)
    assert parsed.calls == []
    assert parsed.errors == ['reasoning not terminated by </think> (output cut off?)']


def test_plain_reply() -> None:
    parsed = parse_output('  The battery is at 80%.\n')
    assert parsed.content == 'The battery is at 80%.'
    assert parsed.calls == [] and parsed.errors == [] and parsed.reasoning == ''


def test_text_before_call_is_content(registry: ToolRegistry) -> None:
    parsed = parse_output('On my way.\n' + render_tool_call('stop', {}), registry)
    assert parsed.content == 'On my way.'
    assert parsed.calls == [ParsedCall('stop', {})]


def test_every_truncation_gives_only_complete_calls(registry: ToolRegistry) -> None:
    first = render_tool_call('navigate_to', {'target': 'kitchen', 'speed': 0.5})
    second = render_tool_call('say', {'text': 'Going "now"'})
    text = f'{first}\n{second}'
    complete = parse_output(text, registry).calls
    assert len(complete) == 2
    for cut in range(len(text)):
        prefix = text[:cut]
        parsed = parse_output(prefix, registry)
        assert parsed.calls == complete[:prefix.count('</tool_call>')], prefix
        inside_block = prefix.count('<tool_call>') > prefix.count('</tool_call>')
        assert bool(parsed.errors) is inside_block, prefix


@pytest.mark.parametrize('text, expected', [
    ('<tool_call>\n<function=stop>\n', 'unterminated <tool_call> block'),
    ('<tool_call>\n<function=stop>\n</tool_call>', 'unterminated <function=...> block'),
    ('<tool_call>\nstop\n</tool_call>', 'malformed tool call'),
    ('<tool_call>\n<function=fly>\n</function>\n</tool_call>', "unknown tool 'fly'"),
    ('<tool_call>\n<function=say>\n<parameter=text>\nhi\n</function>\n</tool_call>',
     "unterminated <parameter=text> block"),
    ('<tool_call>\n<function=say>\nhello\n<parameter=text>\nhi\n</parameter>\n</function>\n'
     '</tool_call>', 'unexpected text in function body'),
    ('<tool_call>\n<function=say>\n<parameter=text>\na\n</parameter>\n<parameter=text>\nb\n'
     '</parameter>\n</function>\n</tool_call>', "parameter 'text' given twice"),
    ('<tool_call>\n<function=navigate_to>\n<parameter=target>\ntable\n</parameter>\n'
     '<parameter=speed>\nfast\n</parameter>\n</function>\n</tool_call>',
     "navigate_to: parameter 'speed': not valid JSON for type number: 'fast'"),
    ('<tool_call>\n<function=navigate_to>\n<parameter=target>\ntable\n</parameter>\n'
     '<parameter=speed>\nNaN\n</parameter>\n</function>\n</tool_call>', 'not valid JSON'),
    ('<tool_call>\n<function=navigate_to>\n<parameter=target>\ntable\n</parameter>\n'
     '<parameter=speed>\n-Infinity\n</parameter>\n</function>\n</tool_call>', 'not valid JSON'),
])
def test_malformed_blocks_are_errors_not_calls(registry: ToolRegistry, text: str,
                                               expected: str) -> None:
    parsed = parse_output(text, registry)
    assert parsed.calls == []
    assert len(parsed.errors) == 1 and expected in parsed.errors[0], parsed.errors
    assert parsed.errors[0].startswith('tool call block 0: ')


def test_sloppy_whitespace_between_tags_is_tolerated(registry: ToolRegistry) -> None:
    text = ('<tool_call><function=navigate_to>  <parameter=target>kitchen</parameter>\n\n'
            '</function></tool_call>')
    assert parse_output(text, registry).calls == [ParsedCall('navigate_to', {'target': 'kitchen'})]


def test_one_bad_block_does_not_hide_a_good_one(registry: ToolRegistry) -> None:
    text = '<tool_call>\n<function=fly>\n</function>\n</tool_call>\n' + render_tool_call(
        'stop', {})
    calls, rejected = parse_tool_calls(text, registry)
    assert [(c.id, c.name) for c in calls] == [('call_0', 'stop')]
    assert rejected == ["tool call block 0: unknown tool 'fly'; known: " + ', '.join(
        registry.names)]


@pytest.mark.parametrize('name, arguments, expected', [
    ('navigate_to', {'target': 'garage'}, "target: 'garage' is not one of"),
    ('navigate_to', {'target': 'table', 'speed': 0.8}, 'speed=0.8 exceeds the limit max 0.5'),
    ('look_at', {'point': {'x': 9.0, 'y': 0, 'z': 1}}, 'point.x=9.0 exceeds the limit max 5.0'),
    ('look_at', {'point': {'x': 1, 'y': 0}}, "'z' is a required property"),
    ('say', {}, "'text' is a required property"),
])
def test_validation_rejects_with_call_id(registry: ToolRegistry, name: str, arguments: dict,
                                         expected: str) -> None:
    text = render_tool_call('stop', {}) + '\n' + render_tool_call(name, arguments)
    calls, rejected = parse_tool_calls(text, registry)
    assert [c.id for c in calls] == ['call_0']
    assert any(r.startswith(f'call_1: {name}: ') and expected in r for r in rejected), rejected


def test_allow_list_is_enforced(registry: ToolRegistry) -> None:
    parsed = parse_output(render_tool_call('stop', {}) + render_tool_call('say', {'text': 'x'}),
                          registry)
    calls, rejected = validate_calls(parsed, registry, allowed={'say'})
    assert [c.name for c in calls] == ['say']
    assert rejected == ["call_0: tool 'stop' is not allowed for this request"]


@pytest.mark.parametrize('raw, schema, expected', [
    ('3', {'type': 'integer'}, 3),
    ('3.0', {'type': 'integer'}, 3),
    (' 0.5 ', {'type': 'number'}, 0.5),
    ('True', {'type': 'boolean'}, True),
    ('false', {'type': 'boolean'}, False),
    ('42', {'type': 'string'}, '42'),
    ('42', None, 42),
    ('not json', None, 'not json'),
    ('["a"]', {'type': 'array', 'items': {'type': 'string'}}, ['a']),
])
def test_convert_value(raw: str, schema: dict, expected: object) -> None:
    value = convert_value(raw, schema)
    assert value == expected and type(value) is type(expected)


def test_huge_exponent_parses_to_infinity_and_is_rejected(registry: ToolRegistry) -> None:
    assert math.isinf(convert_value('1e999', {'type': 'number'}))
    text = render_tool_call('navigate_to', {'target': 'table', 'speed': 0.1}).replace(
        '\n0.1\n', '\n1e999\n')
    calls, rejected = parse_tool_calls(text, registry)
    assert calls == []
    assert rejected == ['call_0: navigate_to: arguments contain a non-finite number '
                        '(NaN or infinity)']


def test_format_value() -> None:
    assert format_value('raw "text"') == 'raw "text"'
    assert format_value({'a': [1, 2.5, True, None], 'b': 'é'}) == '{"a":[1,2.5,true,null],"b":"é"}'
    with pytest.raises(ValueError):
        format_value(math.nan)


def test_without_schemas_values_are_json_or_text() -> None:
    text = ('<tool_call>\n<function=anything>\n<parameter=n>\n5\n</parameter>\n'
            '<parameter=s>\nhello\n</parameter>\n</function>\n</tool_call>')
    assert parse_output(text).calls == [ParsedCall('anything', {'n': 5, 's': 'hello'})]
