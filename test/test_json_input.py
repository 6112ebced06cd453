"""Bounded JSON parsing: deep nesting is a clear ValueError, never a RecursionError."""

from __future__ import annotations

import json

import pytest

from nemotron_ros.engine.json_input import (
    MAX_JSON_DEPTH,
    JsonDepthError,
    check_json_depth,
    json_depth,
    loads_bounded,
    value_depth,
)

DEEP_ARRAYS = '[' * 1000 + ']' * 1000  # the 2,000-character message of issue 9


def test_the_issue_input_makes_plain_json_loads_raise_recursion_error() -> None:
    """Why this module exists: the standard parser fails with a non-ValueError."""
    with pytest.raises(RecursionError):
        json.loads(DEEP_ARRAYS)


@pytest.mark.parametrize('text, depth', [
    ('', 0),
    ('42', 0),
    ('"[[[{{{"', 0),
    ('{}', 1),
    ('{"a": [1, {"b": []}]}', 4),
    ('[[["]]]\\"[[["]]]', 3),
    (r'["\\", [[]]]', 3),  # an escaped backslash ends before the quote
    (r'["\"[[[[", []]', 2),  # an escaped quote does not end the string
    ('"unterminated [[[[', 0),
    ('[[[[', 4),  # malformed: the deepest point a recursive parser would reach
    (DEEP_ARRAYS, 1000),
])
def test_json_depth_counts_brackets_outside_strings(text: str, depth: int) -> None:
    assert json_depth(text) == depth


def test_loads_bounded_refuses_deep_nesting_naming_both_depths() -> None:
    with pytest.raises(JsonDepthError) as caught:
        loads_bounded(DEEP_ARRAYS, 'context_json')
    assert str(caught.value) == (
        f'context_json nests 1000 levels deep, at most {MAX_JSON_DEPTH} are accepted')
    assert isinstance(caught.value, ValueError)


def test_loads_bounded_accepts_the_limit_and_refuses_one_more() -> None:
    at_limit = '[' * MAX_JSON_DEPTH + ']' * MAX_JSON_DEPTH
    assert json_depth(at_limit) == MAX_JSON_DEPTH
    assert loads_bounded(at_limit, 'x') == json.loads(at_limit)
    with pytest.raises(JsonDepthError, match=f'x nests {MAX_JSON_DEPTH + 1} levels deep'):
        loads_bounded('[' + at_limit + ']', 'x')


def test_brackets_inside_strings_do_not_count_against_the_limit() -> None:
    text = json.dumps({'note': '[' * 500 + '{' * 500})
    assert loads_bounded(text, 'attributes_json') == {'note': '[' * 500 + '{' * 500}


def test_invalid_json_is_a_value_error_with_its_position() -> None:
    with pytest.raises(ValueError, match='context_json is not valid JSON: Expecting property name '
                                         'enclosed in double quotes at line 1 column 2'):
        loads_bounded('{not json', 'context_json')


def test_unterminated_string_of_escapes_is_scanned_in_linear_time() -> None:
    # A backtracking string pattern would take quadratic time here; this one must not.
    text = '[' * 40 + '"' + '\\"' * 200_000
    check_json_depth('"' + '\\"' * 200_000, 'x')
    assert json_depth(text) == 40


def test_value_depth_walks_without_recursion_and_stops_at_cycles() -> None:
    assert value_depth({}) == 1
    assert value_depth({'a': [1, {'b': 'c'}]}) == 3
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert value_depth(deep) == MAX_JSON_DEPTH + 1
    cycle: dict = {}
    cycle['self'] = cycle
    assert value_depth(cycle) == MAX_JSON_DEPTH + 1
