"""The tool registry: which tools the model may call, their argument schemas and safety limits.

Tools come from a YAML file written by the robot integrator. The registry is the single
source of truth for three consumers: the prompt (what the model is told), the grammar (what
the model can physically emit) and the validator (what is allowed out to the robot). Those
three must agree, so the schemas are restricted to a small JSON Schema subset that all of
them understand exactly; anything else is refused at load time with one clear message that
names the file, the tool and the offending spot, instead of being half-enforced at run time.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import jsonschema
import yaml

from .types import is_finite_json

NAME_PATTERN = re.compile(r'[A-Za-z_][A-Za-z0-9_]{0,63}')
"""Tool and property names; they appear verbatim in ``<function=...>`` and ``<parameter=...>``."""

SCHEMA_TYPES = ('string', 'number', 'integer', 'boolean', 'object', 'array')

_ANNOTATIONS = frozenset({'type', 'enum', 'description', 'title', 'default'})
_KEYWORDS_BY_TYPE: dict[str, frozenset[str]] = {
    'string': _ANNOTATIONS | {'minLength', 'maxLength'},
    'number': _ANNOTATIONS | {'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum'},
    'integer': _ANNOTATIONS | {'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum'},
    'boolean': _ANNOTATIONS,
    'object': _ANNOTATIONS | {'properties', 'required', 'additionalProperties'},
    'array': _ANNOTATIONS | {'items', 'minItems', 'maxItems'},
}
SUPPORTED_KEYWORDS = frozenset().union(*_KEYWORDS_BY_TYPE.values())

_TOOL_KEYS = frozenset({'name', 'description', 'parameters', 'limits', 'requires_confirmation',
                        'result_timeout_s'})
MAX_RESULT_TIMEOUT_S = 3600.0
"""Longest per-tool ``result_timeout_s``: the ``tool_result_timeout_ms`` parameter's limit."""
_LIMIT_KEYS = frozenset({'min', 'max'})
_EMPTY_PARAMETERS: Mapping[str, Any] = {'type': 'object', 'properties': {}}


class ToolConfigError(ValueError):
    """A tool file or tool definition is unusable; the message names file, tool and problem."""


class UnknownToolError(ValueError):
    """A request named tools that are not in the registry."""


@dataclass(frozen=True)
class Limit:
    """A numeric safety bound on one argument, addressed by a dotted path (``pose.x``)."""

    path: str
    min: Optional[float] = None
    max: Optional[float] = None

    def check(self, value: float) -> Optional[str]:
        """Return a problem description when ``value`` is outside the bound, else None."""
        if self.min is not None and value < self.min:
            return f'{self.path}={value!r} is below the limit min {self.min!r}'
        if self.max is not None and value > self.max:
            return f'{self.path}={value!r} exceeds the limit max {self.max!r}'
        return None


@dataclass(frozen=True)
class ToolSpec:
    """One callable tool: a name, a description for the model, an argument schema and limits.

    ``parameters`` is a JSON Schema of ``type: object`` restricted to the supported subset
    (see :data:`SUPPORTED_KEYWORDS`); treat it as read-only. Specs hash by content so that
    grammars built from them can be cached.

    :param requires_confirmation: a call is held until an operator approves it (a task's
        confirmation gate, :mod:`.tasks`); it is never published unapproved.
    :param result_timeout_s: how long a task step waits for this tool's result, in seconds;
        None = the ``tool_result_timeout_ms`` parameter. A slow tool (driving across a
        building) needs more than a quick one (reading the battery).
    """

    name: str
    description: str
    parameters: dict = field(default_factory=lambda: copy.deepcopy(dict(_EMPTY_PARAMETERS)))
    limits: tuple[Limit, ...] = ()
    requires_confirmation: bool = False
    result_timeout_s: Optional[float] = None

    def __hash__(self) -> int:
        return hash((self.name, self.description, _canonical_json(self.parameters),
                     self.limits, self.requires_confirmation, self.result_timeout_s))

    @functools.cached_property
    def effective_parameters(self) -> dict:
        """The schema with the limits folded into ``minimum``/``maximum``.

        This is what the model is shown and what the grammar admits, so that a model cannot
        write a value the limits would reject; :meth:`ToolRegistry.validate_call` still checks
        schema and limits separately. Treat it as read-only.
        """
        schema = copy.deepcopy(self.parameters)
        for limit in self.limits:
            node = _schema_at(schema, limit.path)
            if node is None:
                continue
            if limit.min is not None:
                node['minimum'] = max(limit.min, node.get('minimum', limit.min))
            if limit.max is not None:
                node['maximum'] = min(limit.max, node.get('maximum', limit.max))
        return schema

    @property
    def properties(self) -> dict:
        """The top-level argument schemas, in declaration order."""
        return self.parameters.get('properties', {})

    @property
    def required(self) -> tuple[str, ...]:
        """Names of the arguments every call must carry."""
        return tuple(self.parameters.get('required', ()))

    def as_function(self) -> dict:
        """The OpenAI-style function object (name, description, parameters)."""
        return {'name': self.name, 'description': self.description,
                'parameters': copy.deepcopy(self.parameters)}


class ToolRegistry:
    """An ordered, validated set of tools, and the checks every model-made call must pass.

    Build it with :meth:`from_yaml` or :meth:`from_dict`; every structural problem is raised
    as one :class:`ToolConfigError` at load time, so a registry that exists is usable. Specs
    passed to the constructor directly get their schemas checked too.
    """

    def __init__(self, tools: Iterable[ToolSpec] = (), source: str = '<tools>') -> None:
        self.source = source
        self._tools: dict[str, ToolSpec] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise ToolConfigError(f'{source}: tool {tool.name!r}: duplicate tool name')
            try:
                check_schema(tool.parameters, 'parameters')
                check_result_timeout(tool.result_timeout_s)
            except ToolConfigError as exc:
                raise ToolConfigError(f'{source}: tool {tool.name!r}: {exc}') from None
            self._tools[tool.name] = tool
        self._validators = {name: _strict_validator(tool.parameters)
                            for name, tool in self._tools.items()}

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> ToolRegistry:
        """Load and validate a tool file.

        :raises ToolConfigError: the file is missing, unreadable, not YAML or not a valid
            tool set; the message starts with the path.
        """
        source = str(path)
        try:
            text = Path(path).read_text(encoding='utf-8')
        except FileNotFoundError:
            raise ToolConfigError(f'{source}: tool file not found') from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ToolConfigError(f'{source}: cannot read tool file: {exc}') from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ToolConfigError(f'{source}: not valid YAML{_yaml_where(exc)}') from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Any, source: str = '<dict>') -> ToolRegistry:
        """Validate already-parsed data of the form ``{'tools': [ {...}, ... ]}``."""
        if not isinstance(data, Mapping):
            raise ToolConfigError(
                f"{source}: expected a mapping with a 'tools' list at the top level, "
                f'got {_kind(data)}')
        unknown = sorted(str(k) for k in data if k != 'tools')
        if unknown:
            raise ToolConfigError(
                f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                "only 'tools' is allowed")
        entries = data.get('tools')
        if not isinstance(entries, list):
            raise ToolConfigError(f"{source}: 'tools' must be a list, got {_kind(entries)}")
        specs = [parse_tool(entry, index, source) for index, entry in enumerate(entries)]
        return cls(specs, source=source)

    @property
    def names(self) -> tuple[str, ...]:
        """Tool names in file order."""
        return tuple(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[ToolSpec]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def get(self, name: str) -> Optional[ToolSpec]:
        """The tool called ``name``, or None."""
        return self._tools.get(name)

    def subset(self, names: Iterable[str]) -> list[ToolSpec]:
        """The named tools in the order given (duplicates dropped).

        :raises UnknownToolError: listing every unknown name and the known ones.
        """
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in self._tools]
        if unknown:
            raise UnknownToolError(
                f"unknown tool(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(self._tools) or '(none)'}")
        return [self._tools[n] for n in wanted]

    def validate_call(self, name: str, arguments: Any) -> list[str]:
        """Every reason why calling ``name`` with ``arguments`` must not happen (empty = ok).

        Checks, in order: the tool exists, all numbers are finite, the arguments follow the
        schema (unknown arguments are refused at every level), and the configured limits.
        """
        tool = self._tools.get(name)
        if tool is None:
            return [f"unknown tool {name!r}; known: {', '.join(self._tools) or '(none)'}"]
        if not isinstance(arguments, dict):
            return [f'{name}: arguments must be an object, got {_kind(arguments)}']
        if not is_finite_json(arguments):
            return [f'{name}: arguments contain a non-finite number (NaN or infinity)']
        problems = [f'{name}: {_error_location(err)}{err.message}'
                    for err in sorted(self._validators[name].iter_errors(arguments),
                                      key=lambda e: list(map(str, e.absolute_path)))]
        if problems:
            return problems
        return [f'{name}: {p}' for p in _limit_problems(tool.limits, arguments)]


def parse_tool(entry: Any, index: int, source: str) -> ToolSpec:
    """Validate one entry of the ``tools`` list and build its :class:`ToolSpec`."""
    if not isinstance(entry, Mapping):
        raise ToolConfigError(f'{source}: tools[{index}]: expected a mapping, got {_kind(entry)}')
    name = entry.get('name')
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ToolConfigError(
            f"{source}: tools[{index}]: 'name' must match {NAME_PATTERN.pattern}, "
            f'got {name!r}')

    def fail(problem: str) -> ToolConfigError:
        return ToolConfigError(f'{source}: tool {name!r}: {problem}')

    unknown = sorted(str(k) for k in entry if k not in _TOOL_KEYS)
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))}; "
                   f"allowed: {', '.join(sorted(_TOOL_KEYS))}")
    description = entry.get('description')
    if not isinstance(description, str) or not description.strip():
        raise fail("'description' must be a non-empty string (the model reads it)")
    parameters = entry.get('parameters', _EMPTY_PARAMETERS)
    if not isinstance(parameters, Mapping) or parameters.get('type') != 'object':
        raise fail("'parameters' must be a JSON Schema with type: object")
    parameters = _plain(parameters)
    try:
        check_schema(parameters, 'parameters')
        jsonschema.Draft202012Validator.check_schema(parameters)
    except ToolConfigError as exc:
        raise fail(str(exc)) from None
    except jsonschema.SchemaError as exc:
        where = '.'.join(['parameters', *map(str, exc.path)])
        raise fail(f'{where}: invalid JSON Schema: {exc.message}') from None
    confirm = entry.get('requires_confirmation', False)
    if not isinstance(confirm, bool):
        raise fail(f"'requires_confirmation' must be true or false, got {confirm!r}")
    timeout = entry.get('result_timeout_s')
    try:
        check_result_timeout(timeout)
    except ToolConfigError as exc:
        raise fail(str(exc)) from None
    try:
        limits = parse_limits(entry.get('limits'), parameters)
    except ToolConfigError as exc:
        raise fail(str(exc)) from None
    return ToolSpec(name=name, description=description.strip(), parameters=parameters,
                    limits=limits, requires_confirmation=confirm,
                    result_timeout_s=None if timeout is None else float(timeout))


def check_result_timeout(value: Any) -> None:
    """Refuse a ``result_timeout_s`` that is not None or a number of seconds in (0, 3600]."""
    if value is not None and not (_is_finite_number(value)
                                  and 0 < value <= MAX_RESULT_TIMEOUT_S):
        raise ToolConfigError(f"'result_timeout_s' must be a number of seconds in (0, "
                              f'{MAX_RESULT_TIMEOUT_S:g}], got {value!r}')


def check_schema(schema: Any, where: str) -> None:
    """Refuse any schema node outside the subset that prompt, grammar and validator share.

    :raises ToolConfigError: '<where>: <problem>' for the first offending node.
    """
    if not isinstance(schema, dict):
        raise ToolConfigError(f'{where}: expected a schema mapping, got {_kind(schema)}')
    for key in schema:
        if key not in SUPPORTED_KEYWORDS:
            raise ToolConfigError(f'{where}: unsupported keyword {key!r}')
    kind = schema.get('type')
    if kind not in SCHEMA_TYPES:
        raise ToolConfigError(
            f"{where}: 'type' must be one of {', '.join(SCHEMA_TYPES)}, got {kind!r}")
    for key in schema:
        if key not in _KEYWORDS_BY_TYPE[kind]:
            raise ToolConfigError(f'{where}: keyword {key!r} does not apply to type {kind!r}')
    for key in ('description', 'title'):
        if key in schema and not isinstance(schema[key], str):
            raise ToolConfigError(f'{where}.{key}: must be a string')
    if 'enum' in schema:
        _check_enum(schema['enum'], kind, f'{where}.enum')
    if kind in ('number', 'integer'):
        _check_number_bounds(schema, where)
    elif kind == 'string':
        _check_count_bounds(schema, 'minLength', 'maxLength', where)
    elif kind == 'array':
        _check_count_bounds(schema, 'minItems', 'maxItems', where)
        if 'items' not in schema:
            raise ToolConfigError(f"{where}: an array needs an 'items' schema")
        check_schema(schema['items'], f'{where}.items')
    elif kind == 'object':
        _check_object(schema, where)


def parse_limits(raw: Any, parameters: Mapping[str, Any]) -> tuple[Limit, ...]:
    """Validate the ``limits`` mapping against the (already checked) parameter schema."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ToolConfigError(f"'limits' must be a mapping of argument paths, got {_kind(raw)}")
    limits = []
    for path, bound in raw.items():
        where = f'limits.{path}'
        target = _schema_at(parameters, str(path))
        if target is None:
            raise ToolConfigError(f'{where}: no such argument in parameters')
        if target.get('type') not in ('number', 'integer'):
            raise ToolConfigError(
                f"{where}: limits apply to numbers only, argument is {target.get('type')!r}")
        if not isinstance(bound, Mapping) or not bound:
            raise ToolConfigError(f'{where}: expected a mapping with min and/or max')
        extra = sorted(str(k) for k in bound if k not in _LIMIT_KEYS)
        if extra:
            raise ToolConfigError(
                f"{where}: unknown key(s) {', '.join(map(repr, extra))}; use min and/or max")
        for key in ('min', 'max'):
            if key in bound and not _is_finite_number(bound[key]):
                raise ToolConfigError(f'{where}.{key}: must be a finite number, '
                                      f'got {bound[key]!r}')
        low, high = bound.get('min'), bound.get('max')
        if low is not None and high is not None and low > high:
            raise ToolConfigError(f'{where}: min {low!r} is greater than max {high!r}')
        lowest = _extreme(max, (low, target.get('minimum'), target.get('exclusiveMinimum')))
        highest = _extreme(min, (high, target.get('maximum'), target.get('exclusiveMaximum')))
        if lowest is not None and highest is not None and lowest > highest:
            raise ToolConfigError(f'{where}: the limits leave no value within the schema bounds')
        limits.append(Limit(path=str(path), min=low, max=high))
    return tuple(limits)


def _check_object(schema: dict, where: str) -> None:
    properties = schema.get('properties', {})
    if not isinstance(properties, dict):
        raise ToolConfigError(f"{where}.properties: must be a mapping, got {_kind(properties)}")
    for prop, sub in properties.items():
        if not isinstance(prop, str) or not NAME_PATTERN.fullmatch(prop):
            raise ToolConfigError(
                f'{where}.properties: name {prop!r} must match {NAME_PATTERN.pattern}')
        check_schema(sub, f'{where}.properties.{prop}')
    required = schema.get('required', [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ToolConfigError(f'{where}.required: must be a list of argument names')
    if len(set(required)) != len(required):
        raise ToolConfigError(f'{where}.required: lists a name twice')
    missing = [r for r in required if r not in properties]
    if missing:
        raise ToolConfigError(
            f"{where}.required: {', '.join(map(repr, missing))} not in properties")
    if schema.get('additionalProperties', False) is not False:
        raise ToolConfigError(
            f'{where}.additionalProperties: only false is supported (or leave it out)')


def _check_enum(values: Any, kind: str, where: str) -> None:
    if not isinstance(values, list) or not values:
        raise ToolConfigError(f'{where}: must be a non-empty list')
    for value in values:
        if not _matches_type(value, kind):
            raise ToolConfigError(f'{where}: value {value!r} is not of type {kind!r}')
        if kind == 'string' and re.search(r'[<\x00-\x1f\x7f]', value):
            raise ToolConfigError(
                f"{where}: value {value!r} contains '<' or a control character, which the "
                'tool-call format cannot carry')
    if len({_canonical_json(v) for v in values}) != len(values):
        raise ToolConfigError(f'{where}: lists a value twice')


def _check_number_bounds(schema: dict, where: str) -> None:
    for key in ('minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum'):
        if key in schema and not _is_finite_number(schema[key]):
            raise ToolConfigError(f'{where}.{key}: must be a finite number, got {schema[key]!r}')
    lows = [schema[k] for k in ('minimum', 'exclusiveMinimum') if k in schema]
    highs = [schema[k] for k in ('maximum', 'exclusiveMaximum') if k in schema]
    if lows and highs and max(lows) > min(highs):
        raise ToolConfigError(f'{where}: the lower bound {max(lows)!r} is above the upper '
                              f'bound {min(highs)!r}')


def _check_count_bounds(schema: dict, low_key: str, high_key: str, where: str) -> None:
    for key in (low_key, high_key):
        value = schema.get(key)
        if key in schema and (not isinstance(value, int) or isinstance(value, bool)
                              or value < 0):
            raise ToolConfigError(f'{where}.{key}: must be a non-negative integer, got {value!r}')
    if low_key in schema and high_key in schema and schema[low_key] > schema[high_key]:
        raise ToolConfigError(
            f'{where}: {low_key} {schema[low_key]} is greater than {high_key} {schema[high_key]}')


def _schema_at(parameters: Mapping[str, Any], path: str) -> Optional[Mapping[str, Any]]:
    node: Mapping[str, Any] = parameters
    for part in path.split('.'):
        if node.get('type') != 'object':
            return None
        node = node.get('properties', {}).get(part)
        if node is None:
            return None
    return node


def _extreme(pick: Callable[..., float], values: Iterable[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return pick(present) if present else None


def _limit_problems(limits: Sequence[Limit], arguments: Mapping[str, Any]) -> list[str]:
    problems = []
    for limit in limits:
        value: Any = arguments
        for part in limit.path.split('.'):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        if not _is_finite_number(value):
            problems.append(f'{limit.path}: expected a finite number, got {value!r}')
            continue
        problem = limit.check(value)
        if problem:
            problems.append(problem)
    return problems


def _strict_validator(parameters: Mapping[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator that also refuses arguments the schema does not declare, at every level."""
    return jsonschema.Draft202012Validator(_closed(copy.deepcopy(dict(parameters))))


def _closed(schema: dict) -> dict:
    if schema.get('type') == 'object':
        schema['additionalProperties'] = False
        for sub in schema.get('properties', {}).values():
            _closed(sub)
    elif schema.get('type') == 'array':
        _closed(schema['items'])
    return schema


def _error_location(error: jsonschema.ValidationError) -> str:
    path = '.'.join(str(p) for p in error.absolute_path)
    return f'{path}: ' if path else ''


def _matches_type(value: Any, kind: str) -> bool:
    if kind == 'string':
        return isinstance(value, str)
    if kind == 'boolean':
        return isinstance(value, bool)
    if kind == 'integer':
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if kind == 'number':
        return _is_finite_number(value)
    return False


def _is_finite_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _plain(value: Any) -> Any:
    """Deep copy YAML data into plain dicts and lists (keeps key order)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(',', ':'), default=str)


def _kind(value: Any) -> str:
    if value is None:
        return 'nothing'
    return type(value).__name__


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, 'problem_mark', None)
    problem = getattr(exc, 'problem', None) or 'parse error'
    if mark is None:
        return f': {problem}'
    return f' (line {mark.line + 1}, column {mark.column + 1}): {problem}'
