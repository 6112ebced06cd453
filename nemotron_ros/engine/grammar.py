"""GBNF grammars that make the model's answer a valid reply or valid native tool calls.

The grammar is the first line of defence of "tool calls are valid by construction": under
it the model can only write Nemotron 3's own tool-call syntax, name allow-listed tools, and
give arguments that follow their schemas. It is written in llama.cpp's GBNF dialect and
admits exactly::

    [reasoning "</think>"]  ( reply | calls )

* ``reasoning`` (only when thinking is on: the prompt then ends with ``<think>\\n``) is free
  text without ``<`` or control characters other than newline and tab;
* ``reply`` (tool_choice auto or none) is non-blank text without ``<`` or control characters
  other than newline;
* ``calls`` (tool_choice auto or required) is up to :data:`MAX_CALLS` blocks, each::

      <tool_call>
      <function=NAME>
      <parameter=ARG>
      VALUE
      </parameter>
      </function>
      </tool_call>

  separated by one newline, optionally preceded by up to two newlines and followed by one.
  Parameters come in the schema's ``properties`` order, required ones always, optional ones
  optionally. String values are raw text (no ``<``, no control characters, ``maxLength``
  honoured, at most :data:`MAX_STRING_CHARS`), enums are the exact literals, numbers have no
  exponent, at most :data:`MAX_FRACTION_DIGITS` fraction digits, and a value within the
  schema's bounds and the tool's limits (inclusive; at most :data:`MAX_INT_DIGITS` integer
  digits where unbounded), and objects and arrays are compact JSON whose strings are
  JSON-escaped.

The grammar is deliberately a little looser than the schema (it cannot express every numeric
range exactly), so every parsed call is validated again by :meth:`ToolRegistry.validate_call`.
Grammars are deterministic and cached: the same tools and options give the same string.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Optional

from .tools import ToolSpec
from .types import ToolChoice

MAX_CALLS = 8
"""Most tool calls the grammar admits in one answer."""

MAX_INT_DIGITS = 6
"""Integer digits of a number whose bounds do not say fewer."""

MAX_FRACTION_DIGITS = 6

DEFAULT_STRING_CHARS = 256
"""Length cap of a string without ``maxLength``."""

MAX_STRING_CHARS = 1024
"""Hard length cap of any string, so that repetition expansion stays small."""

_NO_CONTROL = r'\x00-\x1F\x7F'
_SHARED_RULES = {
    'think-char': r'[^<\x00-\x08\x0B-\x1F\x7F]',
    'reply-start': r'[^<\x00-\x20\x7F]',
    'reply-char': r'[^<\x00-\x09\x0B-\x1F\x7F]',
    'raw-char': rf'[^<{_NO_CONTROL}]',
    'json-char': rf'[^"\\<{_NO_CONTROL}] | "\\" ["\\/nt]',
}


def build_grammar(tools: Sequence[ToolSpec], tool_choice: ToolChoice = ToolChoice.AUTO,
                  thinking: bool = False, max_calls: int = MAX_CALLS) -> str:
    """The GBNF grammar (root rule ``root``) for one request.

    :param tools: the tools the model may call, in the order they are offered.
    :param tool_choice: AUTO (reply or calls), REQUIRED (calls only), NONE (reply only).
    :param thinking: the prompt ends inside ``<think>``, so reasoning and ``</think>`` come first.
    :param max_calls: most tool-call blocks in one answer, 1 to MAX_CALLS (small models tend
        to repeat a call until max_tokens; 1 makes them stop after the first).
    :raises ValueError: REQUIRED with no tools, duplicate tool names, or a bad max_calls.
    """
    choice = ToolChoice(tool_choice)
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f'tool names must be unique, got {names}')
    if choice is ToolChoice.REQUIRED and not tools:
        raise ValueError("tool_choice 'required' needs at least one tool")
    if not 1 <= max_calls <= MAX_CALLS:
        raise ValueError(f'max_calls must be in [1, {MAX_CALLS}], got {max_calls}')
    if choice is ToolChoice.NONE:
        tools = ()
    return _build_cached(tuple(tools), choice, bool(thinking), max_calls)


@functools.lru_cache(maxsize=64)
def _build_cached(tools: tuple[ToolSpec, ...], choice: ToolChoice, thinking: bool,
                  max_calls: int) -> str:
    return _GrammarBuilder().build(tools, choice, thinking, max_calls)


def gbnf_literal(text: str) -> str:
    """``text`` as a double-quoted GBNF literal."""
    escaped = {'"': '\\"', '\\': '\\\\', '\n': '\\n', '\r': '\\r', '\t': '\\t'}
    out = []
    for ch in text:
        if ch in escaped:
            out.append(escaped[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f'\\x{ord(ch):02X}')
        else:
            out.append(ch)
    return '"' + ''.join(out) + '"'


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(',', ':'))


def _repeat(item: str, low: int, high: Optional[int]) -> str:
    """``item`` repeated low..high times (high None = unbounded), as compact GBNF."""
    if high is None:
        return f'{item}{{{low},}}' if low else f'{item}*'
    if low == high:
        return '' if low == 0 else (item if low == 1 else f'{item}{{{low}}}')
    return f'{item}{{{low},{high}}}'


def _join(*parts: str) -> str:
    return ' '.join(p for p in parts if p)


class _GrammarBuilder:
    """Collects named rules while walking the tool schemas; one instance per grammar."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self.shared: set[str] = set()

    def build(self, tools: Sequence[ToolSpec], choice: ToolChoice, thinking: bool,
              max_calls: int = MAX_CALLS) -> str:
        answers = []
        if choice is not ToolChoice.REQUIRED:
            answers.append(self._use('reply'))
        if tools:
            answers.append(self._calls(tools, max_calls))
        head = [f'answer ::= {" | ".join(answers)}']
        if thinking:
            head.insert(0, f'root ::= reasoning {gbnf_literal("</think>")} answer')
            head.append(f'reasoning ::= {self._use("think-char")}*')
        else:
            head.insert(0, 'root ::= answer')
        body = [f'{name} ::= {expr}' for name, expr in self.rules.items()]
        shared = [f'{name} ::= {_SHARED_RULES[name]}' for name in sorted(self.shared)]
        return '\n'.join(head + body + shared) + '\n'

    def _use(self, name: str) -> str:
        if name == 'reply':
            self.rules.setdefault(
                'reply', f'[ \\n]* {self._use("reply-start")} {self._use("reply-char")}*')
        else:
            self.shared.add(name)
        return name

    def _calls(self, tools: Sequence[ToolSpec], max_calls: int) -> str:
        more = _repeat('("\\n" call)', 0, max_calls - 1)
        self.rules['calls'] = _join('"\\n"? "\\n"? call', more, '"\\n"?')
        call_names = [f'tool-{i}' for i in range(len(tools))]
        self.rules['call'] = ' | '.join(call_names)
        for rule, tool in zip(call_names, tools, strict=True):
            self._tool(rule, tool)
        return 'calls'

    def _tool(self, rule: str, tool: ToolSpec) -> None:
        opening = gbnf_literal(f'<tool_call>\n<function={tool.name}>\n')
        closing = gbnf_literal('</function>\n</tool_call>')
        self.rules[rule] = ''  # reserve the position so rules read top-down
        params = []
        required = set(tool.required)
        properties = tool.effective_parameters.get('properties', {})
        for index, (arg, schema) in enumerate(properties.items()):
            param = f'{rule}-p{index}'
            self.rules[param] = ''
            value = self._value(schema, f'{rule}-v{index}', raw_string=True)
            self.rules[param] = _join(gbnf_literal(f'<parameter={arg}>\n'), value,
                                      gbnf_literal('\n</parameter>\n'))
            params.append(param if arg in required else f'{param}?')
        self.rules[rule] = _join(opening, *params, closing)

    def _value(self, schema: dict, rule: str, raw_string: bool = False) -> str:
        """Define ``rule`` for one schema node and return its name."""
        self.rules[rule] = ''
        self.rules[rule] = self._expression(schema, rule, raw_string)
        return rule

    def _expression(self, schema: dict, rule: str, raw_string: bool) -> str:
        kind = schema['type']
        if 'enum' in schema:
            texts = [v if raw_string and kind == 'string' else _json_text(v)
                     for v in schema['enum']]
            return ' | '.join(gbnf_literal(t) for t in texts)
        if kind == 'string':
            return self._string(schema, raw_string)
        if kind in ('number', 'integer'):
            return _number(schema, integer=kind == 'integer')
        if kind == 'boolean':
            return '"true" | "false"'
        if kind == 'array':
            return self._array(schema, rule)
        return self._object(schema, rule)

    def _string(self, schema: dict, raw: bool) -> str:
        cap = min(schema.get('maxLength', DEFAULT_STRING_CHARS), MAX_STRING_CHARS)
        low = min(schema.get('minLength', 0), cap)
        chars = _repeat(self._use('raw-char' if raw else 'json-char'), low, cap)
        if raw:
            return chars or '""'
        return _join('"\\""', chars, '"\\""')

    def _array(self, schema: dict, rule: str) -> str:
        item = self._value(schema['items'], f'{rule}-i')
        low = schema.get('minItems', 0)
        high = schema.get('maxItems')
        if high == 0:
            return '"[]"'
        more = _repeat(f'("," {item})', max(low - 1, 0), None if high is None else high - 1)
        items = _join(item, more)
        return _join('"["', items if low else f'({items})?', '"]"')

    def _object(self, schema: dict, rule: str) -> str:
        required = set(schema.get('required', ()))
        members = []
        for index, (key, sub) in enumerate(schema.get('properties', {}).items()):
            value = self._value(sub, f'{rule}-{index}')
            members.append((_join(gbnf_literal(_json_text(key) + ':'), value), key in required))
        return _join('"{"', _first_member(members, 0), '"}"')


def _first_member(members: list[tuple[str, bool]], start: int) -> str:
    """Members from ``start`` on when none was written yet (so no leading comma)."""
    if start == len(members):
        return ''
    member, required = members[start]
    head = _join(member, *(_after(m, r) for m, r in members[start + 1:]))
    if required:
        return head
    rest = _first_member(members, start + 1)
    return f'({head} | {rest})' if rest else f'({head})?'


def _after(member: str, required: bool) -> str:
    return f'"," {member}' if required else f'("," {member})?'


def _number(schema: dict, integer: bool) -> str:
    """Decimal syntax without exponent whose whole part keeps to the bounds.

    Each sign gets the magnitudes the bounds allow, and the whole part is limited to that
    range exactly; a bound that is a whole number admits only zeros after it, so 1.0 passes
    ``maximum: 1`` and 1.5 does not. Unbounded magnitudes get :data:`MAX_INT_DIGITS` digits.
    Fractions next to a non-integral bound and exclusive bounds stay loose (validation
    checks them).
    """
    low, high = _bounds(schema)
    sides = []
    if high is None or high >= 0:
        sides.append(_magnitude(max(low, 0) if low is not None else 0, high, integer))
    if low is None or low < 0:
        smallest = max(-high, 0) if high is not None else 0
        sides.append(_join('"-"', _group(_magnitude(smallest, -low if low is not None else None,
                                                    integer))))
    return ' | '.join(_group(side) if len(sides) > 1 else side for side in sides)


def _bounds(schema: dict) -> tuple[Optional[float], Optional[float]]:
    lows = [schema[k] for k in ('minimum', 'exclusiveMinimum') if k in schema]
    highs = [schema[k] for k in ('maximum', 'exclusiveMaximum') if k in schema]
    return (max(lows) if lows else None), (min(highs) if highs else None)


def _magnitude(low: float, high: Optional[float], integer: bool) -> str:
    """Unsigned decimals between ``low`` and ``high`` (None: unbounded), both inclusive."""
    cap = 10 ** MAX_INT_DIGITS - 1
    if integer:
        top = cap if high is None else min(math.floor(high), cap)
        return _uint_range(min(math.ceil(low), top), top)
    scale = 10 ** MAX_FRACTION_DIGITS
    top, top_fraction = cap, None
    if high is not None and high < cap + 1:
        top, units = divmod(math.floor(Decimal(repr(high)) * scale), scale)
        top_fraction = _fraction_text(units)
    bottom, units = divmod(math.ceil(Decimal(repr(low)) * scale), scale)
    bottom_fraction = _fraction_text(units) or None
    if bottom >= top:
        top = bottom = min(bottom, top)
        return _join(gbnf_literal(str(top)), _fraction(bottom_fraction, top_fraction))
    segments = [(bottom, bottom, bottom_fraction, None), (bottom + 1, top - 1, None, None),
                (top, top, None, top_fraction)]
    return ' | '.join(_join(_group(_uint_range(a, b)), _fraction(lower, upper))
                      for a, b, lower, upper in _merge_segments(segments))


def _merge_segments(segments: list[tuple[int, int, Optional[str], Optional[str]]]
                    ) -> list[tuple[int, int, Optional[str], Optional[str]]]:
    """Join adjacent whole-part ranges that allow the same fractions; drop empty ones."""
    merged: list[tuple[int, int, Optional[str], Optional[str]]] = []
    for segment in segments:
        if segment[0] > segment[1]:
            continue
        if merged and merged[-1][2:] == segment[2:] and merged[-1][1] + 1 == segment[0]:
            merged[-1] = (merged[-1][0], segment[1], *segment[2:])
        else:
            merged.append(segment)
    return merged


def _fraction_text(units: int) -> str:
    """Millionths as the digits after the decimal point, trailing zeros dropped."""
    return str(units).zfill(MAX_FRACTION_DIGITS).rstrip('0')


def _fraction(lower: Optional[str], upper: Optional[str]) -> str:
    """An optional ``.digits`` part whose value lies between ``0.lower`` and ``0.upper``.

    ``None`` means unbounded; an ``upper`` of ``''`` admits only zeros.
    """
    digits = _fraction_digits(lower, upper, MAX_FRACTION_DIGITS)
    if not digits:
        return ''
    dotted = _join('"."', _group(digits))
    return f'({dotted})?' if lower is None else dotted


def _fraction_digits(lower: Optional[str], upper: Optional[str], room: int) -> str:
    """1..room digits d with 0.lower <= 0.d <= 0.upper ('' when none qualifies)."""
    if room == 0:
        return ''
    if upper is None and lower is None:
        return _repeat('[0-9]', 1, room)
    if upper == '' and lower is None:
        return _repeat('"0"', 1, room)
    groups: dict[tuple[Optional[str], Optional[str]], list[int]] = {}
    for digit in range(10):
        rests = _after_digit(lower, upper, digit)
        if rests is not None:
            groups.setdefault(rests, []).append(digit)
    alternatives = []
    for (rest_lower, rest_upper), digits in groups.items():
        tail = _fraction_digits(rest_lower, rest_upper, room - 1)
        head = _digit_class(str(digits[0]), str(digits[-1]))
        if rest_lower is None:
            alternatives.append(_join(head, f'({tail})?' if tail else ''))
        elif tail:
            alternatives.append(_join(head, _group(tail)))
    return ' | '.join(alternatives)


def _after_digit(lower: Optional[str], upper: Optional[str], digit: int
                 ) -> Optional[tuple[Optional[str], Optional[str]]]:
    """The bounds left for the following digits after ``digit`` (None: digit not allowed)."""
    rest_lower = None
    if lower:
        if digit < int(lower[0]):
            return None
        rest_lower = (lower[1:] or None) if digit == int(lower[0]) else None
    rest_upper = None
    if upper is not None:
        first = int(upper[0]) if upper else 0
        if digit > first:
            return None
        rest_upper = upper[1:] if digit == first else None
    return rest_lower, rest_upper


def _uint_range(low: int, high: int) -> str:
    """The decimal integers ``low..high`` (0 <= low <= high) without leading zeros."""
    if low == 0 and high > 9 and str(high + 1).rstrip('0') == '1':
        return f'"0" | [1-9] {_repeat("[0-9]", 0, len(str(high)) - 1)}'
    alternatives = []
    for length in range(len(str(low)), len(str(high)) + 1):
        first = 0 if length == 1 else 10 ** (length - 1)
        a, b = max(low, first), min(high, 10 ** length - 1)
        if a <= b:
            alternatives.append(_same_length(str(a), str(b)))
    return ' | '.join(alternatives)


def _same_length(low: str, high: str) -> str:
    """Digit strings as long as ``low`` and ``high``, between them (inclusive)."""
    if low == high:
        return gbnf_literal(low)
    rest = len(low) - 1
    if set(low[1:]) <= {'0'} and set(high[1:]) <= {'9'}:
        return _join(_digit_class(low[0], high[0]), _repeat('[0-9]', rest, rest))
    if low[0] == high[0]:
        return _join(gbnf_literal(low[0]), _group(_same_length(low[1:], high[1:])))
    parts = [_join(gbnf_literal(low[0]), _group(_same_length(low[1:], '9' * rest)))]
    if int(high[0]) - int(low[0]) > 1:
        middle = _digit_class(str(int(low[0]) + 1), str(int(high[0]) - 1))
        parts.append(_join(middle, _repeat('[0-9]', rest, rest)))
    parts.append(_join(gbnf_literal(high[0]), _group(_same_length('0' * rest, high[1:]))))
    return ' | '.join(parts)


def _digit_class(low: str, high: str) -> str:
    return gbnf_literal(low) if low == high else f'[{low}-{high}]'


def _group(expression: str) -> str:
    """Parenthesize an expression with top-level alternatives (digits-only grammar parts)."""
    return f'({expression})' if '|' in expression else expression
