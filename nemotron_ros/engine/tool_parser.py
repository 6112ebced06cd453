"""Parse the model's raw text in Nemotron 3's native format into reasoning, reply and calls.

The same syntax serves every model (other models are taught it in their system prompt), so
this one parser is the only place that turns text into tool calls. It is strict where safety
needs it: a block that is not terminated (output cut by ``max_tokens``, a deadline or a
cancel) or not well formed is reported as an error and never becomes a call. Whitespace
between tags is tolerated, because unconstrained models are sloppy there.

Argument values follow the tool's schema: string-typed parameters are the raw text between
the tags with exactly one leading and one trailing newline removed; every other value is
JSON. NaN and infinity are refused while parsing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .tools import ToolRegistry, ToolSpec
from .types import ToolCall

THINK_OPEN = '<think>'
THINK_CLOSE = '</think>'
CALL_OPEN = '<tool_call>'
CALL_CLOSE = '</tool_call>'

_FUNCTION = re.compile(r'\s*<function=([^>\n]*)>(.*)</function>\s*', re.DOTALL)
_PARAM_OPEN = re.compile(r'\s*<parameter=([^>\n]*)>', re.DOTALL)
_PARAM_CLOSE = '</parameter>'

Tools = Union[ToolRegistry, Mapping[str, ToolSpec], Iterable[ToolSpec], None]


class ParseError(ValueError):
    """One malformed part of the output; the message says which and why."""


@dataclass(frozen=True)
class ParsedCall:
    """A well-formed call as written by the model; not yet checked against schema and limits."""

    name: str
    arguments: dict


@dataclass
class ParsedOutput:
    """What the model wrote, split into its parts.

    ``errors`` lists everything malformed or incomplete; such parts are in neither
    ``content`` nor ``calls``.
    """

    reasoning: str = ''
    content: str = ''
    calls: list[ParsedCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_output(text: str, tools: Tools = None, *, thinking: bool = False) -> ParsedOutput:
    """Split raw model text into reasoning, plain content and tool calls.

    :param text: the generated text, special tokens included as text.
    :param tools: the tool schemas used to convert values; without them a value is JSON when
        it parses as JSON and a string otherwise.
    :param thinking: the prompt ended with ``<think>``, so the text starts inside reasoning.
    """
    specs = _spec_lookup(tools)
    reasoning, rest, problem = _split_reasoning(text, thinking)
    out = ParsedOutput(reasoning=reasoning)
    if problem:
        out.errors.append(problem)
    pieces = []
    position = 0
    block = 0
    while True:
        start = rest.find(CALL_OPEN, position)
        if start < 0:
            pieces.append(rest[position:])
            break
        pieces.append(rest[position:start])
        end = rest.find(CALL_CLOSE, start)
        if end < 0:
            out.errors.append(f'tool call block {block}: unterminated {CALL_OPEN} block '
                              '(output cut off?)')
            break
        try:
            out.calls.append(parse_call_body(rest[start + len(CALL_OPEN):end], specs))
        except ParseError as exc:
            out.errors.append(f'tool call block {block}: {exc}')
        position = end + len(CALL_CLOSE)
        block += 1
    out.content = ''.join(pieces).strip()
    return out


def parse_call_body(body: str, specs: Optional[Mapping[str, ToolSpec]] = None) -> ParsedCall:
    """Parse what lies between ``<tool_call>`` and ``</tool_call>``.

    :raises ParseError: malformed block, unknown tool (when ``specs`` is given), repeated or
        malformed parameter, or a value that does not convert.
    """
    match = _FUNCTION.fullmatch(body)
    if match is None:
        if '<function=' in body and '</function>' not in body:
            raise ParseError('unterminated <function=...> block')
        raise ParseError('malformed tool call: expected <function=NAME>...</function> '
                         'inside <tool_call>')
    name, params = match.group(1).strip(), match.group(2)
    spec = None
    if specs is not None:
        spec = specs.get(name)
        if spec is None:
            known = ', '.join(specs) or '(none)'
            raise ParseError(f'unknown tool {name!r}; known: {known}')
    arguments: dict[str, Any] = {}
    for arg, raw in _parameters(name, params):
        if arg in arguments:
            raise ParseError(f'{name}: parameter {arg!r} given twice')
        schema = spec.properties.get(arg) if spec is not None else None
        arguments[arg] = convert_value(raw, schema, f'{name}: parameter {arg!r}')
    return ParsedCall(name=name, arguments=arguments)


def convert_value(raw: str, schema: Optional[Mapping[str, Any]], where: str = 'value') -> Any:
    """Turn one parameter's text into a value as its schema says.

    :raises ParseError: not valid JSON for a non-string type, or NaN/infinity.
    """
    kind = schema.get('type') if schema else None
    if kind == 'string':
        return raw
    text = raw.strip()
    if kind == 'boolean' and text in ('True', 'False'):
        return text == 'True'
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        if kind is None:
            return raw
        raise ParseError(f'{where}: not valid JSON for type {kind}: {_preview(text)}') from exc
    if kind == 'integer' and isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


def validate_calls(parsed: ParsedOutput, registry: ToolRegistry,
                   allowed: Optional[Collection[str]] = None) -> tuple[list[ToolCall], list[str]]:
    """Check every parsed call; return the calls that may go out, and why the rest may not.

    Calls get ids ``call_<n>``, n counting the well-formed calls in output order, so that a
    rejection message names the same id the call would have had. Parse errors (which name
    their ``tool call block``) are included in the rejections.

    :param allowed: the request's allow-list; None means every tool in the registry.
    """
    accepted: list[ToolCall] = []
    rejected = list(parsed.errors)
    for index, call in enumerate(parsed.calls):
        call_id = f'call_{index}'
        if allowed is not None and call.name not in allowed:
            rejected.append(f'{call_id}: tool {call.name!r} is not allowed for this request')
            continue
        problems = registry.validate_call(call.name, call.arguments)
        if problems:
            rejected.extend(f'{call_id}: {p}' for p in problems)
            continue
        accepted.append(ToolCall(id=call_id, name=call.name, arguments=call.arguments))
    return accepted, rejected


def parse_tool_calls(text: str, registry: ToolRegistry, *,
                     allowed: Optional[Collection[str]] = None,
                     thinking: bool = False) -> tuple[list[ToolCall], list[str]]:
    """Parse and validate in one step: (valid calls, rejection messages)."""
    return validate_calls(parse_output(text, registry, thinking=thinking), registry, allowed)


def render_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """One call in the native format (without a trailing newline); the parser's inverse."""
    lines = [CALL_OPEN, f'<function={name}>']
    for arg, value in arguments.items():
        lines += [f'<parameter={arg}>', format_value(value), _PARAM_CLOSE]
    lines += ['</function>', CALL_CLOSE]
    return '\n'.join(lines)


def format_value(value: Any) -> str:
    """A parameter value as the model writes it: strings raw, everything else compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(',', ':'), allow_nan=False)


def _split_reasoning(text: str, thinking: bool) -> tuple[str, str, Optional[str]]:
    """(reasoning, rest, problem). The reasoning is closed by the first ``</think>``."""
    stripped = text.lstrip()
    opened = thinking
    if stripped.startswith(THINK_OPEN):
        text, opened = stripped[len(THINK_OPEN):], True
    close = text.find(THINK_CLOSE)
    if close >= 0 and (opened or CALL_OPEN not in text[:close]):
        return text[:close].strip(), text[close + len(THINK_CLOSE):], None
    if opened:
        return text.strip(), '', 'reasoning not terminated by </think> (output cut off?)'
    return '', text, None


def _parameters(name: str, params: str) -> Iterable[tuple[str, str]]:
    """Yield (name, raw value) for each ``<parameter=...>`` block of a function body."""
    position = 0
    while params[position:].strip():
        opening = _PARAM_OPEN.match(params, position)
        if opening is None:
            raise ParseError(f'{name}: unexpected text in function body: '
                             f'{_preview(params[position:].strip())}')
        end = params.find(_PARAM_CLOSE, opening.end())
        if end < 0:
            raise ParseError(f'{name}: unterminated <parameter={opening.group(1)}> block')
        yield opening.group(1).strip(), _strip_one_newline(params[opening.end():end])
        position = end + len(_PARAM_CLOSE)


def _strip_one_newline(value: str) -> str:
    if value.startswith('\n'):
        value = value[1:]
    if value.endswith('\n'):
        value = value[:-1]
    return value


def _spec_lookup(tools: Tools) -> Optional[Mapping[str, ToolSpec]]:
    if tools is None:
        return None
    if isinstance(tools, Mapping):
        return tools
    return {tool.name: tool for tool in tools}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f'non-finite number {name}')


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + '...')
