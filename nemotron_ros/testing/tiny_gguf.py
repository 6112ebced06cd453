"""Write a small random-weight ``nemotron_h`` GGUF that llama.cpp loads like the real model.

Why: tests must exercise the real llama.cpp code paths for Nemotron 3 Nano (hybrid Mamba-2 +
attention + MLP layers, recurrent state, ChatML with ``<think>``/``<tool_call>`` tokens) without
the 2.5 GB download. The file is built from nothing but numpy and the ``gguf`` package, in tens
of milliseconds, with the same layer kinds, hyperparameter keys, tensor names and tokenizer
family as the converted 4B, so a loader, prompt builder, tokenizer check or state snapshot that
works here meets the same code in llama.cpp as with the real file. Only the weights are random.

Properties tests can rely on:

* identical arguments give byte-identical files (weights come from a per-tensor seeded PCG64
  stream of uniform numbers, not from numpy's normal sampler whose algorithm may change);
* byte-level BPE (``gpt2`` model, ``gpt-2`` pre-tokenizer) over all 256 bytes plus a few hundred
  deterministic merges for common English and robot words, so text round-trips exactly;
* ``<|im_end|>`` is eos (and end-of-generation), ``<s>`` is bos but not added;
  ``<think>``, ``</think>``, ``<tool_call>``, ``</tool_call>`` are single user-defined tokens
  that tokenize from plain text and detokenize as text, as in the real model;
* with ``printable_only`` (default) a constant bias channel in the residual stream pushes the
  logits of control, padding and non-printable byte tokens down by tens of nats, so even random
  sampling yields printable ASCII (invalid UTF-8 makes llama-cpp-python's streaming slow).
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from types import MappingProxyType

import numpy as np

ARCH = 'nemotron_h'
MAMBA, ATTENTION, MLP = 'M', '*', '-'

# The real Nemotron 3 Nano 4B (42 layers: 21 Mamba-2, 4 attention, 17 MLP).
NEMOTRON3_NANO_4B_PATTERN = 'M-M-M-MM-M-M*-M-M*-M-M-M*-M-M-MM*-MMM-M-M-'
# The default pattern repeats this cycle: every kind appears from 4 layers on.
_PATTERN_CYCLE = 'MM*-M-M-'

# Special tokens at the ids the real Nemotron 3 tokenizer uses where PLATFORM.md knows them
# (<s>=1, <|im_start|>=10, <|im_end|>=11, <think>=12, </think>=13).
_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 2, 3, 4
_TOKEN_NORMAL, _TOKEN_UNUSED = 1, 5
_SPECIALS: tuple[tuple[str, int], ...] = (
    ('<unk>', _TOKEN_UNKNOWN),
    ('<s>', _TOKEN_CONTROL),
    ('</s>', _TOKEN_CONTROL),
    *((f'<|reserved_{i}|>', _TOKEN_CONTROL) for i in range(3, 10)),
    ('<|im_start|>', _TOKEN_CONTROL),
    ('<|im_end|>', _TOKEN_CONTROL),
    ('<think>', _TOKEN_USER_DEFINED),
    ('</think>', _TOKEN_USER_DEFINED),
    ('<tool_call>', _TOKEN_USER_DEFINED),
    ('</tool_call>', _TOKEN_USER_DEFINED),
)
SPECIAL_TOKENS: Mapping[str, int] = MappingProxyType(
    {text: i for i, (text, _) in enumerate(_SPECIALS)})
BOS, EOS = '<s>', '<|im_end|>'
_FIRST_BYTE_ID = len(_SPECIALS)
_VOCAB_MULTIPLE = 8
NEMOTRON3_VOCAB_SIZE = 131072
"""The real Nemotron 3 Nano vocabulary size, for ``build_tiny_nemotron_h(vocab_size=...)``."""
MAX_VOCAB_SIZE = 1 << 20
# Generated tokens for large vocabularies: lowercase words, bare and after a space, shortest
# first (what a byte-level BPE learns from English), each one merge of a shorter one and a letter.
_LETTERS = 'abcdefghijklmnopqrstuvwxyz'

# Merges are learnt, in this order, so that each entry becomes a single token. Two-letter
# entries come first, like the frequent pairs a real BPE learns first.
_MERGE_TEXTS: tuple[str, ...] = (
    'th', 'he', 'in', 'er', 'an', 're', 'on', 'at', 'en', 'nd', 'ti', 'es', 'or', 'te', 'ed',
    'is', 'it', 'al', 'ar', 'st', 'nt', 'ng', 'ou', 'le', 've', 'ch', 'ca', 'co', 'ro', 'ta',
    ' t', ' a', ' s', ' c', ' w', ' o', ' b', ' p', ' m', ' f', ' d', ' h', ' i', ' r', ' g',
    ' l', ' n', ' e', ' k', ' u',
    ' the', ' to', ' and', ' of', ' a', ' is', ' in', ' it', ' you', ' I', ' on', ' at',
    ' with', ' for', ' then', ' me', ' my', 'The', 'Go', ' go', ' move', ' pick', ' place',
    ' bring', ' find', ' look', ' stop', ' turn', ' wait', ' say', ' kitchen', ' table',
    ' cup', ' red', ' blue', ' green', ' door', ' dock', ' charging', ' battery', ' robot',
    ' arm', ' left', ' right', ' up', ' please', ' room', ' living', ' person', ' box',
    'function', 'parameter', 'name', 'description', 'parameters', 'tools', 'navigate',
    'target', 'object', 'location', 'to', 'user', 'assistant', 'system', 'tool', 'response',
    'speak', 'text', 'true', 'false', '{"', '":', ' "', '"}', '",', ' {', '\n\n',
)

CHAT_TEMPLATE = (
    "{%- set thinking = enable_thinking if enable_thinking is defined else true -%}\n"
    "{%- set ns = namespace(system='', start=0) -%}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "{%- set ns.system = messages[0]['content'] -%}{%- set ns.start = 1 -%}\n"
    "{%- endif -%}\n"
    "{%- if ns.system or tools -%}\n"
    "{{- '<|im_start|>system\\n' + ns.system -}}\n"
    "{%- if tools -%}\n"
    "{%- if ns.system -%}{{- '\\n\\n' -}}{%- endif -%}\n"
    "{{- '# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>' -}}\n"
    "{%- for tool in tools -%}\n"
    "{%- set fn = tool['function'] if tool['function'] is defined else tool -%}\n"
    "{{- '\\n<function>\\n<name>' + fn['name'] + '</name>' -}}\n"
    "{%- if fn['description'] is defined -%}\n"
    "{{- '\\n<description>' + fn['description'] + '</description>' -}}\n"
    "{%- endif -%}\n"
    "{%- if fn['parameters'] is defined -%}\n"
    "{{- '\\n<parameters>' + (fn['parameters'] | tojson) + '</parameters>' -}}\n"
    "{%- endif -%}\n"
    "{{- '\\n</function>' -}}\n"
    "{%- endfor -%}\n"
    "{{- '\\n</tools>' -}}\n"
    "{%- endif -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- for message in messages[ns.start:] -%}\n"
    "{%- if message['role'] == 'tool' -%}\n"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content']"
    " + '\\n</tool_response><|im_end|>\\n' -}}\n"
    "{%- else -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') -}}\n"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined"
    " and message['tool_calls'] -%}\n"
    "{%- for call in message['tool_calls'] -%}\n"
    "{%- set fc = call['function'] if call['function'] is defined else call -%}\n"
    "{{- '<tool_call>\\n<function=' + fc['name'] + '>\\n' -}}\n"
    "{%- if fc['arguments'] is mapping -%}\n"
    "{%- for key, value in fc['arguments'].items() -%}\n"
    "{{- '<parameter=' + key + '>\\n' + (value if value is string else value | tojson)"
    " + '\\n</parameter>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- else -%}{{- fc['arguments'] ~ '\\n' -}}{%- endif -%}\n"
    "{{- '</function>\\n</tool_call>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' + ('<think>\\n' if thinking else '<think></think>') -}}\n"
    "{%- endif -%}\n"
)

# Arguments for a ~25M-parameter model (hidden 512, 14 layers: the size PLATFORM.md's latency
# numbers used), F16 like the half-size weights real deployments read per token.
MID_PRESET: Mapping[str, object] = MappingProxyType({'n_layer': 14, 'n_embd': 512, 'dtype': 'f16'})
# The real 4B's Mamba-2 mixer (96 heads x 80, state 128, 8 groups) on a narrow residual
# stream: per-layer recurrent state of the real size (~3.9 MB) at a fraction of the weights.
REAL_MIXER_PRESET: Mapping[str, object] = MappingProxyType({
    'pattern': 'MM*-MM', 'n_embd': 256, 'ssm_n_head': 96, 'ssm_head_dim': 80,
    'ssm_state': 128, 'ssm_groups': 8, 'dtype': 'f16',
})


@dataclass(frozen=True)
class TinyNemotronHSpec:
    """Every size of the model, after defaults are derived from ``n_embd``."""

    pattern: str
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    ssm_n_head: int
    ssm_head_dim: int
    ssm_state: int
    ssm_groups: int
    ssm_conv: int
    context_length: int
    dtype: str
    printable_only: bool
    seed: int
    name: str
    vocab_size: int | None = None

    @property
    def n_layer(self) -> int:
        return len(self.pattern)

    @property
    def ssm_inner(self) -> int:
        return self.ssm_n_head * self.ssm_head_dim

    @property
    def ssm_conv_dim(self) -> int:
        return self.ssm_inner + 2 * self.ssm_groups * self.ssm_state

    def validate(self) -> None:
        """Raise ValueError for a combination llama.cpp would reject or crash on."""
        if not self.pattern or set(self.pattern) - {MAMBA, ATTENTION, MLP}:
            raise ValueError(f'pattern must be a non-empty string of M, * and -: {self.pattern!r}')
        positive = ('n_embd', 'n_head', 'n_head_kv', 'head_dim', 'n_ff', 'ssm_n_head',
                    'ssm_head_dim', 'ssm_state', 'ssm_groups', 'ssm_conv', 'context_length')
        for field in positive:
            if getattr(self, field) < 1:
                raise ValueError(f'{field} must be positive')
        if self.n_head % self.n_head_kv:
            raise ValueError('n_head must be a multiple of n_head_kv')
        if self.ssm_n_head % self.ssm_groups:
            raise ValueError('ssm_n_head must be a multiple of ssm_groups')
        if self.dtype not in ('f32', 'f16'):
            raise ValueError(f"dtype must be 'f32' or 'f16': {self.dtype!r}")
        if self.printable_only and self.n_embd < 2:
            raise ValueError('printable_only needs n_embd >= 2 (one bias channel)')
        if self.vocab_size is not None and not 0 < self.vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f'vocab_size must be in [1, {MAX_VOCAB_SIZE}] (or None for the '
                             f'small vocabulary), got {self.vocab_size}')


def default_layer_pattern(n_layer: int) -> str:
    """A Nemotron-like layer pattern: ``MM*-M-M-`` repeated and cut to ``n_layer`` layers."""
    if n_layer < 1:
        raise ValueError('n_layer must be positive')
    return (_PATTERN_CYCLE * (n_layer // len(_PATTERN_CYCLE) + 1))[:n_layer]


def build_tiny_nemotron_h(
    path: str | os.PathLike[str],
    *,
    n_layer: int | None = None,
    n_embd: int = 64,
    seed: int = 0,
    pattern: str | None = None,
    n_head: int | None = None,
    n_head_kv: int | None = None,
    head_dim: int | None = None,
    n_ff: int | None = None,
    ssm_n_head: int | None = None,
    ssm_head_dim: int | None = None,
    ssm_state: int | None = None,
    ssm_groups: int | None = None,
    ssm_conv: int = 4,
    context_length: int = 8192,
    dtype: str = 'f32',
    printable_only: bool = True,
    name: str = 'tiny-nemotron-h',
    vocab_size: int | None = None,
) -> Path:
    """Write a random-weight ``nemotron_h`` GGUF to ``path`` and return it as a Path.

    ``pattern`` uses the Hugging Face notation (``M`` Mamba-2, ``*`` attention, ``-`` MLP) and
    wins over ``n_layer`` (which must then agree or be None); by default ``n_layer`` is 8 and the
    pattern is :func:`default_layer_pattern`. Sizes left as None are derived from ``n_embd``:
    attention and Mamba head dims 16 below ``n_embd`` 256 and 64 from there, ``n_embd //
    head_dim`` query heads over ``max(1, n_head // 4)`` KV heads, a Mamba inner size of
    ``2 * n_embd``, state 16 (64 from ``n_embd`` 256) in 2 groups (4 from 256), and
    ``n_ff = 4 * n_embd``. ``dtype`` selects F32 or F16 matrices (norms and SSM parameters
    stay F32 as in converted models). ``seed`` selects the weights; the tokenizer never changes.
    ``printable_only`` keeps random output to printable ASCII, ``<|im_end|>`` and the four
    user-defined tags (see the module docstring); turn it off to test invalid UTF-8 handling.
    ``vocab_size`` grows the vocabulary to exactly that many tokens with generated letter
    merges (see :func:`build_vocab`; ``NEMOTRON3_VOCAB_SIZE`` is the real model's), so grammar
    and sampling costs can be measured at a real vocabulary size.
    The file is written to a temporary name and renamed, so a concurrent reader never sees a
    partial file. See ``MID_PRESET`` and ``REAL_MIXER_PRESET`` for larger variants.
    """
    spec = _make_spec(
        n_layer=n_layer, n_embd=n_embd, seed=seed, pattern=pattern, n_head=n_head,
        n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff, ssm_n_head=ssm_n_head,
        ssm_head_dim=ssm_head_dim, ssm_state=ssm_state, ssm_groups=ssm_groups,
        ssm_conv=ssm_conv, context_length=context_length, dtype=dtype,
        printable_only=printable_only, name=name, vocab_size=vocab_size)
    return write_gguf(spec, path)


def _make_spec(*, n_layer: int | None, pattern: str | None, n_embd: int,
               **sizes: object) -> TinyNemotronHSpec:
    if pattern is None:
        pattern = default_layer_pattern(8 if n_layer is None else n_layer)
    elif n_layer is not None and n_layer != len(pattern):
        raise ValueError(f'n_layer={n_layer} disagrees with pattern of {len(pattern)} layers')
    wide = n_embd >= 256
    head_dim = _pick(sizes.pop('head_dim'), 64 if wide else 16)
    n_head = _pick(sizes.pop('n_head'), max(1, n_embd // head_dim))
    ssm_head_dim = _pick(sizes.pop('ssm_head_dim'), 64 if wide else 16)
    derived = {
        'head_dim': head_dim,
        'n_head': n_head,
        'n_head_kv': _pick(sizes.pop('n_head_kv'), max(1, n_head // 4)),
        'n_ff': _pick(sizes.pop('n_ff'), 4 * n_embd),
        'ssm_head_dim': ssm_head_dim,
        'ssm_n_head': _pick(sizes.pop('ssm_n_head'), max(1, 2 * n_embd // ssm_head_dim)),
        'ssm_state': _pick(sizes.pop('ssm_state'), 64 if wide else 16),
        'ssm_groups': _pick(sizes.pop('ssm_groups'), 4 if wide else 2),
    }
    spec = TinyNemotronHSpec(pattern=pattern, n_embd=n_embd, **derived, **sizes)
    spec.validate()
    return spec


def _pick(value: object, default: int) -> int:
    return default if value is None else int(value)


def write_gguf(spec: TinyNemotronHSpec, path: str | os.PathLike[str]) -> Path:
    """Write the model described by ``spec`` atomically to ``path``."""
    import gguf

    spec.validate()
    path = Path(path)
    vocab = build_vocab(spec.vocab_size)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write(gguf.GGUFWriter(tmp, ARCH), spec, vocab)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write(writer, spec: TinyNemotronHSpec, vocab: Vocab) -> None:
    try:
        _add_metadata(writer, spec)
        _add_tokenizer(writer, vocab)
        for tensor_name, array in _tensors(spec, vocab):
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _add_metadata(writer, spec: TinyNemotronHSpec) -> None:
    writer.add_name(spec.name)
    writer.add_description(
        f'random weights (seed {spec.seed}) for tests; layer pattern {spec.pattern}')
    writer.add_file_type(0 if spec.dtype == 'f32' else 1)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length([spec.n_ff if k == MLP else 0 for k in spec.pattern])
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv([spec.n_head_kv if k == ATTENTION else 0 for k in spec.pattern])
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_eps(1e-5)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_ssm_conv_kernel(spec.ssm_conv)
    writer.add_ssm_inner_size(spec.ssm_inner)
    writer.add_ssm_state_size(spec.ssm_state)
    writer.add_ssm_time_step_rank(spec.ssm_n_head)
    writer.add_ssm_group_count(spec.ssm_groups)


@dataclass(frozen=True)
class Vocab:
    """The tokenizer tables written into the GGUF."""

    tokens: tuple[str, ...]
    types: tuple[int, ...]
    merges: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.tokens)

    def suppressed_ids(self) -> list[int]:
        """Ids that random generation should not produce with ``printable_only``."""
        keep_special = {EOS, '<think>', '</think>', '<tool_call>', '</tool_call>'}
        printable = {_BYTE_TO_UNICODE[b] for b in (*range(0x20, 0x7F), 0x09, 0x0A)}
        out = []
        for i, (text, kind) in enumerate(zip(self.tokens, self.types, strict=True)):
            if kind == _TOKEN_NORMAL:
                if _FIRST_BYTE_ID <= i < _FIRST_BYTE_ID + 256 and text not in printable:
                    out.append(i)
            elif text not in keep_special:
                out.append(i)
        return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map used by byte-level BPE."""
    visible = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
    mapping = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_TO_UNICODE = bytes_to_unicode()


def _encode(text: str) -> str:
    return ''.join(_BYTE_TO_UNICODE[b] for b in text.encode('utf-8'))


def _bpe(symbols: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Apply ranked merges (lowest rank first, leftmost on ties) as llama.cpp's BPE does."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), math.inf), i)
                 for i, (a, b) in enumerate(pairwise(symbols))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def learn_merges(texts: Iterable[str]) -> list[tuple[str, str]]:
    """Merges that turn each text (in order) into one token, reusing earlier merges."""
    ranks: dict[tuple[str, str], int] = {}
    for text in texts:
        symbols = list(_encode(text))
        while len(pieces := _bpe(symbols, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
    return list(ranks)


def build_vocab(size: int | None = None) -> Vocab:
    """Specials, the 256 byte tokens, merged tokens, then UNUSED padding to a multiple of 8.

    With ``size``, generated word merges (:func:`_word_merges`) follow the learnt ones until
    the vocabulary has exactly ``size`` tokens; ValueError when ``size`` is below the small
    vocabulary's. The result is deterministic: the same ``size`` gives the same tables.
    """
    tokens = [text for text, _ in _SPECIALS]
    types = [kind for _, kind in _SPECIALS]
    tokens += [_BYTE_TO_UNICODE[b] for b in range(256)]
    types += [_TOKEN_NORMAL] * 256
    merges = learn_merges(_MERGE_TEXTS)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            types.append(_TOKEN_NORMAL)
    if size is not None:
        base = len(tokens) + -len(tokens) % _VOCAB_MULTIPLE
        if size < base:
            raise ValueError(f'vocab_size must be at least {base} (the small vocabulary), '
                             f'got {size}')
        for a, b in _word_merges():
            if len(tokens) >= size:
                break
            if a + b not in seen:
                seen.add(a + b)
                tokens.append(a + b)
                types.append(_TOKEN_NORMAL)
                merges.append((a, b))
    while len(tokens) % _VOCAB_MULTIPLE and (size is None or len(tokens) < size):
        tokens.append(f'[PAD{len(tokens)}]')
        types.append(_TOKEN_UNUSED)
    return Vocab(tuple(tokens), tuple(types), tuple(f'{a} {b}' for a, b in merges))


def _word_merges() -> Iterator[tuple[str, str]]:
    """(left, right) merges making every lowercase word, bare and after a space, by length."""
    space = _BYTE_TO_UNICODE[ord(' ')]
    prefixes = ['']
    while True:
        longer = []
        for prefix in prefixes:
            for letter in _LETTERS:
                if prefix:
                    yield prefix, letter
                yield space + prefix, letter
                longer.append(prefix + letter)
        prefixes = longer


def _add_tokenizer(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model('gpt2')
    writer.add_tokenizer_pre('gpt-2')
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.types))
    writer.add_token_merges(list(vocab.merges))
    writer.add_bos_token_id(SPECIAL_TOKENS[BOS])
    writer.add_eos_token_id(SPECIAL_TOKENS[EOS])
    writer.add_unk_token_id(SPECIAL_TOKENS['<unk>'])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


class _Weights:
    """Deterministic random tensors; each is seeded by (seed, name) so tensors are independent
    of the order they are made in and of the other tensors' sizes."""

    def __init__(self, spec: TinyNemotronHSpec) -> None:
        self.spec = spec
        self.matrix_dtype = np.float32 if spec.dtype == 'f32' else np.float16

    def uniform(self, name: str, shape: Sequence[int], low: float, high: float) -> np.ndarray:
        seq = np.random.SeedSequence([self.spec.seed, zlib.crc32(name.encode())])
        rng = np.random.Generator(np.random.PCG64(seq))
        return (low + (high - low) * rng.random(tuple(shape))).astype(np.float32)

    def scaled(self, name: str, shape: Sequence[int], std: float) -> np.ndarray:
        bound = std * math.sqrt(3.0)
        return self.uniform(name, shape, -bound, bound)

    def linear(self, name: str, n_out: int, n_in: int, *, reads_bias: bool = False,
               writes_bias: bool = False) -> np.ndarray:
        """A {n_in, n_out} ggml matrix (numpy (n_out, n_in)) with unit-gain scale.

        With ``printable_only`` the residual stream's channel 0 carries a constant: layers
        neither read it (zero column) nor write it (zero row), so it stays exact.
        """
        w = self.scaled(name, (n_out, n_in), 1.0 / math.sqrt(n_in))
        if self.spec.printable_only and reads_bias:
            w[:, 0] = 0.0
        if self.spec.printable_only and writes_bias:
            w[0, :] = 0.0
        return w.astype(self.matrix_dtype)


def _tensors(spec: TinyNemotronHSpec, vocab: Vocab) -> Iterable[tuple[str, np.ndarray]]:
    w = _Weights(spec)
    yield from _embedding_and_head(w, spec, vocab)
    for i, kind in enumerate(spec.pattern):
        yield f'blk.{i}.attn_norm.weight', np.ones(spec.n_embd, np.float32)
        if kind == MAMBA:
            yield from _mamba_layer(w, spec, i)
        elif kind == ATTENTION:
            yield from _attention_layer(w, spec, i)
        else:
            yield from _mlp_layer(w, spec, i)


def _embedding_and_head(w: _Weights, spec: TinyNemotronHSpec,
                        vocab: Vocab) -> Iterable[tuple[str, np.ndarray]]:
    n, n_vocab = spec.n_embd, vocab.size
    embd = w.scaled('token_embd.weight', (n_vocab, n), 1.0)
    # Logits have a standard deviation of about 2: peaked enough for varied text.
    head = w.scaled('output.weight', (n_vocab, n), 2.0 / math.sqrt(n))
    if spec.printable_only:
        # Channel 0 holds sqrt(n) for every token: half the stream's energy at the input, and
        # still ~1/3 of its RMS after the layers; suppressed tokens read it with a large
        # negative weight, which costs them ~ -100 / sqrt(1 + growth) nats (about -30).
        embd[:, 0] = math.sqrt(n)
        head[:, 0] = 0.0
        head[vocab.suppressed_ids(), 0] = -100.0 / math.sqrt(n)
    yield 'token_embd.weight', embd.astype(w.matrix_dtype)
    yield 'output_norm.weight', np.ones(n, np.float32)
    yield 'output.weight', head.astype(w.matrix_dtype)


def _mamba_layer(w: _Weights, spec: TinyNemotronHSpec, i: int) -> Iterable[tuple[str, np.ndarray]]:
    p = f'blk.{i}'
    heads, conv_dim = spec.ssm_n_head, spec.ssm_conv_dim
    d_in_proj = spec.ssm_inner + conv_dim + heads
    yield f'{p}.ssm_in.weight', w.linear(f'{p}.ssm_in.weight', d_in_proj, spec.n_embd,
                                         reads_bias=True)
    conv_bound = 1.0 / math.sqrt(spec.ssm_conv)
    yield f'{p}.ssm_conv1d.weight', w.uniform(f'{p}.ssm_conv1d.weight',
                                              (conv_dim, spec.ssm_conv), -conv_bound, conv_bound)
    yield f'{p}.ssm_conv1d.bias', w.uniform(f'{p}.ssm_conv1d.bias', (conv_dim,), -0.1, 0.1)
    # dt = softplus(dt_bias) log-uniform in [1e-3, 1e-1], A = -uniform[1, 16], D = 1: the
    # initialisation of the Mamba-2 reference code.
    log_dt = w.uniform(f'{p}.ssm_dt.bias', (heads,), math.log(1e-3), math.log(1e-1))
    dt = np.exp(log_dt)
    yield f'{p}.ssm_dt.bias', (dt + np.log(-np.expm1(-dt))).astype(np.float32)
    yield f'{p}.ssm_a', -w.uniform(f'{p}.ssm_a', (heads, 1), 1.0, 16.0)
    yield f'{p}.ssm_d', np.ones((heads, 1), np.float32)
    yield f'{p}.ssm_norm.weight', np.ones(
        (spec.ssm_groups, spec.ssm_inner // spec.ssm_groups), np.float32)
    yield f'{p}.ssm_out.weight', w.linear(f'{p}.ssm_out.weight', spec.n_embd, spec.ssm_inner,
                                          writes_bias=True)


def _attention_layer(w: _Weights, spec: TinyNemotronHSpec,
                     i: int) -> Iterable[tuple[str, np.ndarray]]:
    p = f'blk.{i}'
    q_dim, kv_dim = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
    yield f'{p}.attn_q.weight', w.linear(f'{p}.attn_q.weight', q_dim, spec.n_embd,
                                         reads_bias=True)
    yield f'{p}.attn_k.weight', w.linear(f'{p}.attn_k.weight', kv_dim, spec.n_embd,
                                         reads_bias=True)
    yield f'{p}.attn_v.weight', w.linear(f'{p}.attn_v.weight', kv_dim, spec.n_embd,
                                         reads_bias=True)
    yield f'{p}.attn_output.weight', w.linear(f'{p}.attn_output.weight', spec.n_embd, q_dim,
                                              writes_bias=True)


def _mlp_layer(w: _Weights, spec: TinyNemotronHSpec, i: int) -> Iterable[tuple[str, np.ndarray]]:
    p = f'blk.{i}'
    yield f'{p}.ffn_up.weight', w.linear(f'{p}.ffn_up.weight', spec.n_ff, spec.n_embd,
                                         reads_bias=True)
    # ReLU^2 of unit-variance inputs has a second moment of 1.5: scale down to keep unit gain.
    down = w.linear(f'{p}.ffn_down.weight', spec.n_embd, spec.n_ff, writes_bias=True)
    yield f'{p}.ffn_down.weight', (down / np.float32(math.sqrt(1.5))).astype(down.dtype)
