"""Tool registry: each malformed tool file gives one clear error; model calls are checked."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from nemotron_ros.engine.tools import ToolConfigError, ToolRegistry, ToolSpec, UnknownToolError

EXAMPLE = Path(__file__).resolve().parents[1] / 'config' / 'tools.example.yaml'

GOOD_TOOL = {
    'name': 'navigate_to',
    'description': 'Drive to a named place.',
    'parameters': {
        'type': 'object',
        'properties': {
            'target': {'type': 'string', 'enum': ['kitchen', 'table']},
            'speed': {'type': 'number', 'minimum': 0.1, 'maximum': 1.0},
            'pose': {
                'type': 'object',
                'properties': {'x': {'type': 'number'}, 'y': {'type': 'number'}},
                'required': ['x'],
            },
        },
        'required': ['target'],
    },
    'limits': {'speed': {'max': 0.5}, 'pose.x': {'min': -5, 'max': 5}},
}


def load(tool: dict) -> ToolRegistry:
    return ToolRegistry.from_dict({'tools': [tool]}, source='tools.yaml')


def with_change(path: str, value: object) -> dict:
    """GOOD_TOOL with the key at dotted ``path`` set to ``value`` (deleted when value is ...)."""
    tool = copy.deepcopy(GOOD_TOOL)
    *parents, last = path.split('.')
    node = tool
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return tool


def test_example_file_loads_with_all_tools() -> None:
    registry = ToolRegistry.from_yaml(EXAMPLE)
    assert {'navigate_to', 'pick', 'place', 'say', 'stop', 'get_battery', 'move_base',
            'look_at'} <= set(registry.names)
    assert registry.get('stop').properties == {}
    assert registry.get('move_base').requires_confirmation is True
    assert registry.get('say').properties['text']['maxLength'] == 200


def test_good_tool_loads() -> None:
    registry = load(GOOD_TOOL)
    tool = registry.get('navigate_to')
    assert 'navigate_to' in registry and 'other' not in registry
    assert tool.required == ('target',)
    assert [limit.path for limit in tool.limits] == ['speed', 'pose.x']


@pytest.mark.parametrize('tool, expected', [
    (with_change('name', ...), "tools[0]: 'name' must match"),
    (with_change('name', '1bad'), "tools[0]: 'name' must match"),
    (with_change('name', 'has space'), "tools[0]: 'name' must match"),
    (with_change('description', ...), "tool 'navigate_to': 'description' must be"),
    (with_change('description', '  '), "tool 'navigate_to': 'description' must be"),
    (with_change('paramters', {}), "tool 'navigate_to': unknown key(s) 'paramters'"),
    (with_change('parameters', {'type': 'array', 'items': {'type': 'string'}}),
     "tool 'navigate_to': 'parameters' must be a JSON Schema with type: object"),
    (with_change('parameters', 'target'), "'parameters' must be a JSON Schema"),
    (with_change('parameters.properties.speed.pattern', '^a'),
     "tool 'navigate_to': parameters.properties.speed: unsupported keyword 'pattern'"),
    (with_change('parameters.properties.target.oneOf', []),
     "parameters.properties.target: unsupported keyword 'oneOf'"),
    (with_change('parameters.properties.target.format', 'uri'),
     "unsupported keyword 'format'"),
    (with_change('parameters.properties.target', {'$ref': '#/x'}), "unsupported keyword '$ref'"),
    (with_change('parameters.properties.speed.type', ['number', 'null']),
     "parameters.properties.speed: 'type' must be one of"),
    (with_change('parameters.properties.speed.type', ...),
     "parameters.properties.speed: 'type' must be one of"),
    (with_change('parameters.properties.speed.minLength', 2),
     "parameters.properties.speed: keyword 'minLength' does not apply to type 'number'"),
    (with_change('parameters.required', ['target', 'missing']),
     "parameters.required: 'missing' not in properties"),
    (with_change('parameters.required', 'target'), 'parameters.required: must be a list'),
    (with_change('parameters.properties.target.enum', []),
     'parameters.properties.target.enum: must be a non-empty list'),
    (with_change('parameters.properties.target.enum', ['kitchen', 3]),
     "parameters.properties.target.enum: value 3 is not of type 'string'"),
    (with_change('parameters.properties.target.enum', ['a', 'a']), 'lists a value twice'),
    (with_change('parameters.properties.target.enum', ['<b>']), "contains '<'"),
    (with_change('parameters.properties.speed.minimum', 2.0), 'lower bound 2.0 is above'),
    (with_change('parameters.properties.speed.maximum', float('nan')),
     'speed.maximum: must be a finite number'),
    (with_change('parameters.properties.target.maxLength', -1),
     'target.maxLength: must be a non-negative integer'),
    (with_change('parameters.additionalProperties', True),
     'parameters.additionalProperties: only false is supported'),
    (with_change('parameters.properties.tags', {'type': 'array'}),
     "parameters.properties.tags: an array needs an 'items' schema"),
    (with_change('parameters.properties.tags', {'type': 'array', 'items': {'type': 'str'}}),
     "parameters.properties.tags.items: 'type' must be one of"),
    (with_change('parameters.properties.pose.properties.x.anyOf', []),
     "parameters.properties.pose.properties.x: unsupported keyword 'anyOf'"),
    (with_change('parameters.properties.bad-name', {'type': 'string'}),
     "name 'bad-name' must match"),
    (with_change('parameters.properties.speed.description', 3),
     'speed.description: must be a string'),
    (with_change('limits', {'nope': {'max': 1}}), "tool 'navigate_to': limits.nope: no such"),
    (with_change('limits', {'target': {'max': 1}}), 'limits.target: limits apply to numbers'),
    (with_change('limits', {'pose.z': {'max': 1}}), 'limits.pose.z: no such argument'),
    (with_change('limits', {'speed': {'min': 0.9, 'max': 0.2}}),
     'limits.speed: min 0.9 is greater than max 0.2'),
    (with_change('limits', {'speed': {'maximum': 1}}), "limits.speed: unknown key(s) 'maximum'"),
    (with_change('limits', {'speed': {'min': 2}}),
     'limits.speed: the limits leave no value within the schema bounds'),
    (with_change('limits', {'speed': {}}), 'limits.speed: expected a mapping with min'),
    (with_change('limits', {'speed': {'max': 'fast'}}), 'limits.speed.max: must be a finite'),
    (with_change('limits', [1]), "'limits' must be a mapping"),
    (with_change('requires_confirmation', 'yes'), "'requires_confirmation' must be true"),
])
def test_bad_tool_gives_one_clear_error(tool: dict, expected: str) -> None:
    with pytest.raises(ToolConfigError) as info:
        load(tool)
    message = str(info.value)
    assert message.startswith('tools.yaml: ')
    assert expected in message
    assert '\n' not in message and 'Traceback' not in message


def test_non_integer_count_is_refused() -> None:
    tool = with_change('parameters.properties.tags',
                       {'type': 'array', 'items': {'type': 'string'}, 'minItems': 1.5})
    with pytest.raises(ToolConfigError, match=r"tool 'navigate_to': parameters\.properties\.tags"
                                              r'\.minItems: must be a non-negative integer'):
        load(tool)


def test_duplicate_tool_name() -> None:
    with pytest.raises(ToolConfigError, match="tools.yaml: tool 'navigate_to': duplicate"):
        ToolRegistry.from_dict({'tools': [GOOD_TOOL, GOOD_TOOL]}, source='tools.yaml')


@pytest.mark.parametrize('data, expected', [
    ([], "expected a mapping with a 'tools' list at the top level, got list"),
    (None, 'got nothing'),
    ({'tools': {'a': 1}}, "'tools' must be a list, got dict"),
    ({'tools': [GOOD_TOOL], 'extra': 1}, "unknown top-level key(s) 'extra'"),
    ({'tools': ['navigate_to']}, 'tools[0]: expected a mapping, got str'),
])
def test_bad_top_level_shape(data: object, expected: str) -> None:
    with pytest.raises(ToolConfigError) as info:
        ToolRegistry.from_dict(data, source='tools.yaml')
    assert str(info.value) == f'tools.yaml: {expected}' or expected in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / 'absent.yaml'
    with pytest.raises(ToolConfigError, match=f'^{path}: tool file not found$'):
        ToolRegistry.from_yaml(path)


def test_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / 'tools.yaml'
    path.write_text('tools:\n  - name: a\n   description: [unclosed\n')
    with pytest.raises(ToolConfigError, match=rf'^{path}: not valid YAML \(line \d+, column'):
        ToolRegistry.from_yaml(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / 'tools.yaml'
    path.write_text('')
    with pytest.raises(ToolConfigError, match="expected a mapping with a 'tools' list"):
        ToolRegistry.from_yaml(path)


def test_parameters_may_be_left_out() -> None:
    registry = load({'name': 'stop', 'description': 'Stop.'})
    assert registry.validate_call('stop', {}) == []
    assert registry.validate_call('stop', {'now': True})  # undeclared arguments are refused


def test_subset_keeps_order_and_lists_unknown_names() -> None:
    registry = ToolRegistry.from_yaml(EXAMPLE)
    assert [t.name for t in registry.subset(['say', 'stop', 'say'])] == ['say', 'stop']
    with pytest.raises(UnknownToolError, match="unknown tool.*'fly', 'dig'; known: navigate_to"):
        registry.subset(['say', 'fly', 'dig'])


def test_validate_call_accepts_valid_arguments() -> None:
    registry = load(GOOD_TOOL)
    assert registry.validate_call('navigate_to', {'target': 'kitchen'}) == []
    assert registry.validate_call(
        'navigate_to', {'target': 'table', 'speed': 0.5, 'pose': {'x': 1.0, 'y': -2}}) == []


@pytest.mark.parametrize('arguments, expected', [
    ({}, "'target' is a required property"),
    ({'target': 'garage'}, "target: 'garage' is not one of"),
    ({'target': 'kitchen', 'speed': 'fast'}, "speed: 'fast' is not of type 'number'"),
    ({'target': 'kitchen', 'speed': 1.5}, 'speed: 1.5 is greater than the maximum of 1.0'),
    ({'target': 'kitchen', 'colour': 'red'}, "Additional properties are not allowed ('colour'"),
    ({'target': 'kitchen', 'pose': {'y': 1}}, "pose: 'x' is a required property"),
    ({'target': 'kitchen', 'pose': {'x': 1, 'q': 1}}, 'pose: Additional properties'),
    ({'target': 'kitchen', 'speed': 0.8}, 'speed=0.8 exceeds the limit max 0.5'),
    ({'target': 'kitchen', 'pose': {'x': -7}}, 'pose.x=-7 is below the limit min -5'),
    ({'target': 'kitchen', 'speed': math.nan}, 'non-finite number'),
    ({'target': 'kitchen', 'speed': math.inf}, 'non-finite number'),
    ({'target': 'kitchen', 'pose': {'x': -math.inf}}, 'non-finite number'),
])
def test_validate_call_rejects(arguments: dict, expected: str) -> None:
    problems = load(GOOD_TOOL).validate_call('navigate_to', arguments)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith('navigate_to: ') for p in problems)


def test_validate_call_unknown_tool_and_bad_arguments() -> None:
    registry = load(GOOD_TOOL)
    assert registry.validate_call('fly', {}) == ["unknown tool 'fly'; known: navigate_to"]
    assert 'arguments must be an object' in registry.validate_call('navigate_to', [1])[0]


def test_specs_hash_by_content() -> None:
    first = load(GOOD_TOOL).get('navigate_to')
    second = load(copy.deepcopy(GOOD_TOOL)).get('navigate_to')
    assert first == second and hash(first) == hash(second)
    assert ToolSpec('a', 'b') != ToolSpec('a', 'c')


def test_specs_given_directly_are_checked() -> None:
    bad = ToolSpec('odd', 'Odd tool.', {'type': 'object', 'properties': {'x': {'type': 'date'}}})
    with pytest.raises(ToolConfigError, match="<tools>: tool 'odd': parameters.properties.x"):
        ToolRegistry([bad])


def test_effective_parameters_fold_limits_into_bounds() -> None:
    tool = load(GOOD_TOOL).get('navigate_to')
    effective = tool.effective_parameters['properties']
    assert (effective['speed']['minimum'], effective['speed']['maximum']) == (0.1, 0.5)
    assert effective['pose']['properties']['x'] == {'type': 'number', 'minimum': -5,
                                                    'maximum': 5}
    assert tool.parameters['properties']['speed']['maximum'] == 1.0
