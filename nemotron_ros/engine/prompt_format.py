"""Turn a conversation and a tool list into the prompt text a model was trained on.

Two formats, one tool-call syntax:

* :class:`NemotronFormat` writes Nemotron 3's own ChatML layout by hand: the tool list in the
  system turn (``# Tools`` ... ``<tools>`` ... ``</tools>`` plus the call-format reminder),
  ``<think>`` switching, past calls in the native ``<tool_call>`` syntax and tool results
  as a user turn of ``<tool_response>`` blocks. The layout follows the model's chat template
  as ported by Ollama (``Nemotron3NanoRenderer``) and Qwen3-Coder's ``render_extra_keys``.
* :class:`TemplateFormat` renders any other model's embedded GGUF chat template in a
  sandbox. The system message lists the tools as ready-made call blocks in the *same* native
  syntax (:func:`render_call_menu`), so one grammar and one parser serve every model.
  Nemotron's long tool section, with its ``example_function_name`` example, is meant for a
  model trained on it: a small model copies the example instead of choosing a tool.

Each render returns a :class:`RenderedPrompt` whose ``prefix`` (the system turn with the
tools) is identical for every request with the same system prompt and tools: a backend
snapshots the model state after it and only evaluates the rest per request.

Both formats defang chat-control markers in message text (commands, perception, context, tool
results, past answers) with :class:`MarkerGuard`: the model's own special tokens, which its
tokenizer would otherwise turn into control tokens, plus the common ChatML/Llama/Gemma markers
and this package's tool tags. So text from other nodes cannot forge a turn, a system prompt or
an end of text: after rendering, every control token in a prompt is one the format put there.
The configured system prompt and tool descriptions are trusted and rendered verbatim.
"""

from __future__ import annotations

import abc
import datetime
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import jinja2
import jinja2.sandbox

from .tool_parser import format_value, render_tool_call
from .tools import ToolSpec
from .types import Message, ToolCall

IM_START = '<|im_start|>'
IM_END = '<|im_end|>'

TOOLS_HEADER = '# Tools\n\nYou have access to the following functions:\n\n<tools>'
TOOLS_FOOTER = (
    '\n</tools>'
    '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:'
    '\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>'
    '\nvalue_1\n</parameter>\n<parameter=example_parameter_2>'
    '\nThis is the value for the second parameter\nthat can span\nmultiple lines'
    '\n</parameter>\n</function>\n</tool_call>'
    '\n\n<IMPORTANT>\nReminder:'
    '\n- Function calls MUST follow the specified format: an inner <function=...></function>'
    ' block must be nested within <tool_call></tool_call> XML tags'
    '\n- Required parameters MUST be specified'
    '\n- You may provide optional reasoning for your function call in natural language'
    ' BEFORE the function call, but NOT after'
    '\n- If there is no function call available, answer the question like normal with your'
    ' current knowledge and do not tell the user about function calls'
    '\n</IMPORTANT>')
"""The call-format instructions of Nemotron 3's chat template, verbatim."""

CALL_MENU_HEADER = '# Tools\n\nTo act, reply with one or more of these function calls, filled in:'
CALL_MENU_FOOTER = 'If no function fits, answer in plain words.'

_PROBES = ('\x01probe-a\x01', '\x02probe-b\x02')

DEFANG = '\u200b'
"""Zero-width space: inserted after a marker's first character, it keeps the text readable
while no tokenizer matches the marker any more."""

GENERIC_MARKERS = (
    '<|im_start|>', '<|im_end|>', '<|endoftext|>', '<|begin_of_text|>', '<|end_of_text|>',
    '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>', '<|eom_id|>', '<|python_tag|>',
    '[INST]', '[/INST]', '<<SYS>>', '<</SYS>>', '<s>', '</s>', '<start_of_turn>',
    '<end_of_turn>', '<think>', '</think>', '<tool_call>', '</tool_call>', '<tool_response>',
    '</tool_response>')
"""Markers defanged for every model: chat-template markers of the common families and the
tags of this package's own prompt layout, whether or not the vocabulary has them as tokens."""

_MARKUP_CHARS = frozenset('<>[]|')
# Any ``<|word|>``: the marker shape of ChatML, Llama 3, Phi and most recent templates.
_MARKER_SHAPE = r'<\|[^<>|\s\u200b]{1,64}\|>'


class PromptFormatError(ValueError):
    """A prompt cannot be rendered: no chat template, a broken one, or one that refuses."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A full prompt and its reusable head.

    :param prefix: the fixed part (system turn with tools), same across requests with the
        same system prompt and tools; ``text`` always starts with it.
    :param text: the whole prompt, generation prompt included.
    :param reasoning_open: the prompt ends inside ``<think>``: the answer starts with
        reasoning (pass it as ``thinking`` to the grammar and the parser).
    """

    prefix: str
    text: str
    reasoning_open: bool = False

    def __post_init__(self) -> None:
        if not self.text.startswith(self.prefix):
            raise ValueError('RenderedPrompt.text must start with its prefix')


def vocab_markers(special: Iterable[str], added: Iterable[str] = ()) -> list[str]:
    """The token texts a format must defang, from what a tokenizer matches in plain text.

    :param special: control/special token texts (all of them count).
    :param added: other tokens matched as a whole (llama.cpp's user-defined tokens, Hugging
        Face's added tokens); only those that look like markup (``<think>``, ``[TOOL_CALLS]``)
        count, not the whitespace runs or words some vocabularies add.
    """
    return [*special, *(t for t in added if _MARKUP_CHARS.intersection(t))]


class MarkerGuard:
    """Defangs chat-control markers in untrusted text by inserting :data:`DEFANG`.

    :param special_tokens: the model's special token texts (control, user-defined and unknown
        tokens, which its tokenizer matches in plain text); texts shorter than two characters
        cannot be defanged this way and are skipped.

    A marker is broken by a zero-width space after its first character, never removed:
    removing ``<|im_start|>`` from ``<|im_<|im_start|>start|>`` would assemble a new one. The
    guard repeats until no marker is left; an insertion can never complete a marker (none
    contains :data:`DEFANG`), so that ends after at most one pass per marker found.
    """

    def __init__(self, special_tokens: Iterable[str] = ()) -> None:
        self.markers: frozenset[str] = frozenset(
            t for t in (*GENERIC_MARKERS, *special_tokens)
            if len(t) >= 2 and t.strip() and DEFANG not in t)
        self._pattern = re.compile(f'{_trie_pattern(self.markers)}|{_MARKER_SHAPE}')

    def __call__(self, text: str) -> str:
        """``text`` with every marker defanged (unchanged when it holds none)."""
        found = 1
        while found:
            text, found = self._pattern.subn(_defang_match, text)
        return text

    def call(self, call: ToolCall) -> str:
        """A past tool call in the native syntax, its argument values defanged."""
        return render_tool_call(
            call.name, {name: self(format_value(v)) for name, v in call.arguments.items()})


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex matching any of ``words``, longest first, as a trie.

    A plain alternation tries every word at each candidate position; vocabularies with a
    thousand ``<SPECIAL_n>`` tokens made that cost ~20 ms on text full of ``<``.
    """
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[''] = {}

    def emit(node: dict) -> str:
        branches = [re.escape(char) + emit(child) for char, child in sorted(node.items())
                    if char]
        if not branches:
            return ''
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f'(?:{body})?' if '' in node else body

    return emit(trie)


def _defang_match(match: re.Match) -> str:
    marker = match.group()
    return marker[0] + DEFANG + marker[1:]


class PromptFormat(abc.ABC):
    """Renders a conversation plus tools into prompt text; pure and thread-safe.

    :param special_tokens: the model's special token texts, defanged in message text (see
        :class:`MarkerGuard`).
    """

    name: str = ''

    def __init__(self, special_tokens: Iterable[str] = ()) -> None:
        self.guard = MarkerGuard(special_tokens)

    @abc.abstractmethod
    def render(self, messages: Sequence[Message], tools: Sequence[ToolSpec] = (), *,
               thinking: bool = False) -> RenderedPrompt:
        """The prompt for ``messages`` (a leading system message becomes the system turn)."""


class NemotronFormat(PromptFormat):
    """Nemotron 3's native ChatML layout, written without a template engine."""

    name = 'nemotron'

    def render(self, messages: Sequence[Message], tools: Sequence[ToolSpec] = (), *,
               thinking: bool = False) -> RenderedPrompt:
        system, rest = split_system(messages)
        prefix = _turn('system', system_text(system, tools))
        body = ''.join(_nemotron_turns(rest, self.guard))
        tail = f'{IM_START}assistant\n<think>\n' if thinking else (
            f'{IM_START}assistant\n<think></think>')
        return RenderedPrompt(prefix=prefix, text=prefix + body + tail, reasoning_open=thinking)


class TemplateFormat(PromptFormat):
    """A model's own Jinja chat template, rendered in an immutable sandbox.

    Tools are offered in the system message as a menu of call blocks in the native syntax
    (:func:`render_call_menu`); past calls are written into assistant text in the same syntax
    and tool results become user turns of ``<tool_response>`` blocks, so the template needs
    no tool support of its own. A template that refuses a system role gets the system text
    at the top of the first user turn instead.
    """

    name = 'template'

    def __init__(self, template: str, bos_token: str = '', eos_token: str = '',
                 special_tokens: Iterable[str] = ()) -> None:
        super().__init__(special_tokens)
        if not template or not template.strip():
            raise PromptFormatError('the chat template is empty')
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.filters['tojson'] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(template)
        except jinja2.TemplateError as exc:
            raise PromptFormatError(f'the chat template does not compile: {exc}') from None
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._probe_prefixes: dict[tuple[str, bool], str] = {}

    def render(self, messages: Sequence[Message], tools: Sequence[ToolSpec] = (), *,
               thinking: bool = False) -> RenderedPrompt:
        system, rest = split_system(messages)
        head = system_text(system, tools, render_call_menu)
        turns = _plain_turns(rest, self.guard)
        text = self._render(head, turns, thinking, generation=True)
        prefix = _common_prefix(self._probe_prefix(head, thinking), text)
        return RenderedPrompt(prefix=prefix[:prefix.rfind('\n') + 1], text=text)

    def _probe_prefix(self, head: str, thinking: bool) -> str:
        """What every conversation after ``head`` starts with (found by rendering probes).

        It depends on the system text and the thinking switch only, which stay the same for
        every request and task step, so it is rendered once per pair, not per request (a
        template render costs about a millisecond).
        """
        key = (head, thinking)
        cached = self._probe_prefixes.get(key)
        if cached is None:
            probes = [self._render(head, [{'role': 'user', 'content': p}], thinking, False)
                      for p in _PROBES]
            cached = _common_prefix(*probes)
            if len(self._probe_prefixes) >= 8:
                self._probe_prefixes.clear()
            self._probe_prefixes[key] = cached
        return cached

    def _render(self, system: str, turns: list[dict], thinking: bool, generation: bool) -> str:
        with_system = ([{'role': 'system', 'content': system}] if system else []) + turns
        try:
            return self._apply(with_system, thinking, generation)
        except jinja2.TemplateError as exc:
            if not system:
                raise PromptFormatError(f'the chat template failed: {exc}') from None
            first_error = exc
        try:
            return self._apply(_merge_system(system, turns), thinking, generation)
        except jinja2.TemplateError:
            raise PromptFormatError(f'the chat template failed: {first_error}') from None

    def _apply(self, messages: list[dict], thinking: bool, generation: bool) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=generation, enable_thinking=thinking,
            bos_token=self.bos_token, eos_token=self.eos_token)


def select_prompt_format(metadata: Mapping[str, Any], *, bos_token: str = '',
                         eos_token: str = '',
                         special_tokens: Iterable[str] = ()) -> PromptFormat:
    """Pick the format for a model from its GGUF metadata.

    Nemotron's native format when the chat template uses ``<function=`` tool calls, or the
    architecture is ``nemotron_h``/``nemotron_h_moe`` with a ChatML template or none;
    otherwise the model's own template. ``special_tokens`` are the texts the model's tokenizer
    turns into special tokens; the format defangs them in message text.

    :raises PromptFormatError: a non-Nemotron model without a chat template.
    """
    architecture = str(metadata.get('general.architecture', ''))
    template = str(metadata.get('tokenizer.chat_template') or '')
    nemotron_arch = architecture in ('nemotron_h', 'nemotron_h_moe')
    if '<function=' in template or (nemotron_arch and (not template or IM_START in template)):
        return NemotronFormat(special_tokens)
    if not template.strip():
        raise PromptFormatError(
            f'model (architecture {architecture or "unknown"!r}) has no chat template '
            "(GGUF key 'tokenizer.chat_template'); only Nemotron 3 models work without one")
    return TemplateFormat(template, bos_token=bos_token, eos_token=eos_token,
                          special_tokens=special_tokens)


def render_tools_section(tools: Sequence[ToolSpec]) -> str:
    """The ``# Tools`` block of Nemotron 3's system turn ('' without tools).

    Schemas are shown with the tools' limits folded in, so the model sees the bounds that
    the grammar and the validator apply.
    """
    if not tools:
        return ''
    return TOOLS_HEADER + ''.join(_function_block(t) for t in tools) + TOOLS_FOOTER


def render_call_menu(tools: Sequence[ToolSpec]) -> str:
    """The tools section for models other than Nemotron 3 ('' without tools).

    Each tool is one line of description (its parameters' descriptions and allowed values
    included: enum values joined by ``|``, numeric bounds with the limits folded in) followed
    by its call block in the native syntax, so a model that copies a block copies a real tool
    name and the exact syntax. The blocks show the required parameters only, each with its
    name in capitals as the value: small models copy whatever stands in a value slot (a first
    enum value, a lower bound, an optional parameter), while a placeholder, which the grammar
    refuses for enums and numbers, leaves the choice to the request.

    Small models also copy the block nearest the request. Hence the tools are listed in
    reverse order, so that the first tool offered comes last, and a generic block
    (``NAME``/``ARGUMENT``/``VALUE``, which the grammar refuses) follows them, so that no tool
    wins by position alone. With Nemotron's section, SmolLM2-135M copied the example or
    picked ``get_battery`` for most robot commands; with this menu it picks the right tool for
    about two commands in three, in any order of the tools.
    """
    if not tools:
        return ''
    blocks = [_call_block(t) for t in reversed(tools)]
    generic = 'Format:\n' + render_tool_call('NAME', {'ARGUMENT': 'VALUE'})
    return '\n\n'.join([CALL_MENU_HEADER, *blocks, generic, CALL_MENU_FOOTER])


def system_text(system: str, tools: Sequence[ToolSpec],
                section: Callable[[Sequence[ToolSpec]], str] = render_tools_section) -> str:
    """The system turn's content: the system prompt, a blank line, then the tools section."""
    return '\n\n'.join(part for part in (system, section(tools)) if part)


def split_system(messages: Sequence[Message]) -> tuple[str, list[Message]]:
    """(system prompt, remaining messages): only a leading system message is the system turn."""
    if messages and messages[0].role == 'system':
        return messages[0].content, list(messages[1:])
    return '', list(messages)


def _function_block(tool: ToolSpec) -> str:
    out = [f'\n<function>\n<name>{tool.name}</name>']
    if tool.description:
        out.append(f'\n<description>{tool.description.strip()}</description>')
    out.append('\n<parameters>')
    parameters = tool.effective_parameters
    for name, fields in parameters.get('properties', {}).items():
        out.append(f'\n<parameter>\n<name>{name}</name>')
        if 'type' in fields:
            out.append(f"\n<type>{_python_str(fields['type'])}</type>")
        if 'description' in fields:
            out.append(f"\n<description>{fields['description'].strip()}</description>")
        if 'enum' in fields:
            out.append(f"\n<enum>{_tojson(fields['enum'])}</enum>")
        out.append(_extra_keys(fields, ('name', 'type', 'description', 'enum')))
        out.append('\n</parameter>')
    # The template writes the other keys first and ``required`` last, whatever the key order.
    out.append(_extra_keys(parameters, ('type', 'properties', 'required')))
    if 'required' in parameters:
        out.append(f"\n<required>{_tojson(parameters['required'])}</required>")
    out.append('\n</parameters>\n</function>')
    return ''.join(out)


def _call_block(tool: ToolSpec) -> str:
    parameters = tool.effective_parameters
    properties = parameters.get('properties', {})
    required = set(parameters.get('required', ()))
    notes = [tool.description.strip()]
    for name, fields in properties.items():
        details = [fields.get('description', '').strip().rstrip('.'), _value_hint(fields)]
        label = name if name in required else f'{name} (optional)'
        notes.append(f"{label}: {'; '.join(d for d in details if d)}.")
    placeholders = {name: name.upper() for name in properties if name in required}
    description = ' '.join(note for note in notes if note)
    return f'{description}\n{render_tool_call(tool.name, placeholders)}'


def _value_hint(fields: Mapping[str, Any]) -> str:
    """What a parameter's value may be, in a few words ('' for plain text)."""
    kind = fields.get('type')
    if 'enum' in fields:
        return ' | '.join(v if isinstance(v, str) else _tojson(v) for v in fields['enum'])
    if kind in ('number', 'integer'):
        bounds = [f'{word} {_python_str(fields[key])}' for key, word in (
            ('minimum', 'at least'), ('exclusiveMinimum', 'greater than'),
            ('maximum', 'at most'), ('exclusiveMaximum', 'less than')) if key in fields]
        if 'minimum' in fields and 'maximum' in fields and len(bounds) == 2:
            bounds = [f"from {_python_str(fields['minimum'])} to {_python_str(fields['maximum'])}"]
        return ' '.join([kind, ', '.join(bounds)]) if bounds else kind
    if kind == 'boolean':
        return 'true | false'
    if kind == 'string':
        return ''
    schema = {k: v for k, v in fields.items() if k not in ('description', 'title')}
    return f'JSON {_tojson(schema)}'


def _extra_keys(fields: Mapping[str, Any], handled: Sequence[str]) -> str:
    """Every other schema key as ``<key>value</key>`` (JSON for containers), like the template."""
    out = []
    for key, value in fields.items():
        if key in handled:
            continue
        text = _tojson(value) if isinstance(value, (dict, list)) else _python_str(value)
        out.append(f'\n<{key}>{text}</{key}>')
    return ''.join(out)


def _nemotron_turns(messages: Sequence[Message], guard: MarkerGuard) -> list[str]:
    out = []
    for index, message in enumerate(messages):
        if message.role == 'assistant':
            out.append(_nemotron_assistant(message, guard))
        elif message.role == 'tool':
            opens = index == 0 or messages[index - 1].role != 'tool'
            closes = index + 1 == len(messages) or messages[index + 1].role != 'tool'
            out.append((f'{IM_START}user\n' if opens else '')
                       + f'<tool_response>\n{guard(message.content)}\n'
                       + '</tool_response>\n' + (f'{IM_END}\n' if closes else ''))
        else:
            out.append(_turn(message.role, guard(message.content)))
    return out


def _nemotron_assistant(message: Message, guard: MarkerGuard) -> str:
    content = ('<think></think>' + guard(message.content)).strip()
    if not message.tool_calls:
        return _turn('assistant', content)
    calls = ''.join(guard.call(c) + '\n' for c in message.tool_calls)
    return f'{IM_START}assistant\n{content}\n{calls}{IM_END}\n'


def _plain_turns(messages: Sequence[Message], guard: MarkerGuard) -> list[dict]:
    """Messages as plain role/content dicts a tool-unaware template can render."""
    turns: list[dict] = []
    for message in messages:
        if message.role == 'tool':
            block = f'<tool_response>\n{guard(message.content)}\n</tool_response>'
            if turns and turns[-1].get('tool_results'):
                turns[-1]['content'] += '\n' + block
            else:
                turns.append({'role': 'user', 'content': block, 'tool_results': True})
            continue
        content = guard(message.content)
        if message.tool_calls:
            calls = '\n'.join(guard.call(c) for c in message.tool_calls)
            content = f'{content.strip()}\n{calls}' if content.strip() else calls
        turns.append({'role': message.role, 'content': content})
    return [{'role': t['role'], 'content': t['content']} for t in turns]


def _merge_system(system: str, turns: list[dict]) -> list[dict]:
    merged = [dict(t) for t in turns]
    if merged and merged[0]['role'] == 'user':
        merged[0]['content'] = f"{system}\n\n{merged[0]['content']}"
        return merged
    return [{'role': 'user', 'content': system}] + merged


def _turn(role: str, content: str) -> str:
    return f'{IM_START}{role}\n{content}{IM_END}\n'


def _common_prefix(*texts: str) -> str:
    shortest = min(texts, key=len)
    for index, ch in enumerate(shortest):
        if any(t[index] != ch for t in texts):
            return shortest[:index]
    return shortest


def _tojson(value: Any, indent: Optional[int] = None, **_: Any) -> str:
    """Hugging Face's ``tojson``: no key sorting, no HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _python_str(value: Any) -> str:
    """Jinja's ``| string`` of a scalar, as the template would print it."""
    return str(value)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)
