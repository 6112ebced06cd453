"""Parse JSON that arrives from other nodes without letting its shape harm the process.

``json.loads`` recurses once per nesting level, so 1,000 nested arrays (2,000 characters) raise
``RecursionError``: not a ``ValueError``, so it would escape a message callback and end the
node. Every JSON the node accepts therefore goes through :func:`loads_bounded`, which measures
the nesting depth with a linear, non-recursive scan *before* parsing and refuses anything deeper
than :data:`MAX_JSON_DEPTH` with a ``ValueError`` that says how deep it was. Code that walks an
already-parsed value (rendering, copying) can rely on that bound; :func:`value_depth` checks it
for values built in-process, again without recursion.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

MAX_JSON_DEPTH = 32
"""Nesting levels (arrays and objects) a JSON input may have; robot data needs a handful."""

# One JSON string (to its closing quote, or to the end when unterminated) or one bracket. The
# string branch always matches once it starts, so the scan never backtracks: linear time.
_TOKENS = re.compile(r'"(?:[^"\\]+|\\.)*(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)


class JsonDepthError(ValueError):
    """A JSON input nests deeper than accepted; the message names the input and both depths."""


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text``, found without recursion.

    Brackets inside strings (escapes included) do not count. Malformed text still gets a
    number, the deepest point reached, which is what a recursive parser would descend to.
    """
    depth = deepest = 0
    for match in _TOKENS.finditer(text):
        char = match.group()
        if char in '[{':
            depth += 1
            deepest = max(deepest, depth)
        elif char in ']}':
            depth -= 1
    return deepest


def check_json_depth(text: str, what: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise :class:`JsonDepthError` when ``text`` nests deeper than ``max_depth``.

    Cheap for ordinary input: text with no more brackets than ``max_depth`` cannot be deeper,
    and counting them runs in C.
    """
    if text.count('[') + text.count('{') <= max_depth:
        return
    depth = json_depth(text)
    if depth > max_depth:
        raise JsonDepthError(f'{what} nests {depth} levels deep, at most {max_depth} are accepted')


def loads_bounded(text: str, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for untrusted input: ValueError (never RecursionError) when it is bad.

    :param what: the input's name for messages, e.g. ``'context_json'``.
    :raises JsonDepthError: it nests deeper than ``max_depth``.
    :raises ValueError: it is not valid JSON; the message names ``what`` and the position.
    """
    check_json_depth(text, what, max_depth)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f'{what} is not valid JSON: {exc.msg} at line {exc.lineno} '
                         f'column {exc.colno}') from None


def value_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON-like value, walked without recursion.

    The walk stops as soon as the depth passes ``limit`` and returns ``limit + 1`` then, so a
    self-referencing container costs no more than a deep one.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        if depth > limit:
            return limit + 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest
