"""The torch backend on tiny random NemotronH checkpoints made at test time: BF16, ModelOpt FP8.

The checkpoints are converted from the project's tiny ``nemotron_h`` GGUF, so they run
transformers' real hybrid Mamba-2/attention/MLP code. Generation tests load the BF16
checkpoint with float32 compute and one thread: on this CPU (no native BF16) that is the
faster choice, and the guarantees under test do not depend on the dtype.

FP8 tolerance: the FP8 checkpoint rounds every Linear weight to e4m3 (3 mantissa bits, at
most 1/16 relative error per weight, ~2-3 % RMS). Over a tiny model's few layers that gives
logits within a few percent of the BF16 reference (measured: 1.2 % relative L2 error and
cosine 0.99993 dequantized, 1.4 % and 0.99991 with FP8 activations through ``_scaled_mm``),
so ``FP8_REL_TOL`` = 5 % with a cosine above 0.998; FP8 values loaded without their scales
(plain ``from_pretrained``) are ~100 % off.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')
pytest.importorskip('xgrammar')

from backend_cases import TOOLS, chat, checked_calls  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from nemotron_ros.engine.backends import BackendError, RequestError, create_backend  # noqa: E402
from nemotron_ros.engine.backends.torch.backend import TorchBackend, TorchConfig  # noqa: E402
from nemotron_ros.engine.backends.torch.checkpoint import (  # noqa: E402
    CheckpointError,
    fp8_tensor_names,
    load_checkpoint,
)
from nemotron_ros.engine.backends.torch.modelopt_fp8 import FP8Linear, fp8_matmul_supported  # noqa: E402
from nemotron_ros.engine.backends.torch.xgrammar_constraint import GrammarBackend  # noqa: E402
from nemotron_ros.engine.grammar import build_grammar  # noqa: E402
from nemotron_ros.engine.tool_parser import render_tool_call  # noqa: E402
from nemotron_ros.engine.types import (  # noqa: E402
    CancelToken,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    ToolChoice,
)
from nemotron_ros.testing.tiny_hf import tiny_hf_path  # noqa: E402

FP8_REL_TOL = 0.05
FP8_MIN_COSINE = 0.998
PROMPT = ('<|im_start|>system\nYou are a robot.<|im_end|>\n<|im_start|>user\nBring the red cup '
          'to the kitchen table, then go to the charging dock.<|im_end|>\n'
          '<|im_start|>assistant\n<think></think><tool_call>\n<function=navigate_to>\n')


def _options(path: Path, **extra: object) -> dict:
    return {'model_path': str(path), 'device': 'cpu', 'dtype': 'float32', 'n_threads': 1,
            **extra}


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp('hf_models')


@pytest.fixture(scope='module')
def bf16_dir(model_dir: Path) -> Path:
    return tiny_hf_path(model_dir)


@pytest.fixture(scope='module')
def fp8_dir(model_dir: Path) -> Path:
    return tiny_hf_path(model_dir, fp8=True)


@pytest.fixture(scope='module')
def backend(bf16_dir: Path):
    backend = create_backend('torch', TOOLS, _options(bf16_dir))
    backend.load()
    yield backend
    backend.unload()


def _logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors='pt').input_ids
    with torch.inference_mode():
        return model(input_ids=ids.to(model.device), use_cache=False).logits[0].float().cpu()


def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).norm() / reference.norm())


def _cosine(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(),
                                                       dim=0))


@pytest.fixture(scope='module')
def tokenizer(bf16_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bf16_dir))


@pytest.fixture(scope='module')
def reference_logits(bf16_dir: Path, tokenizer) -> torch.Tensor:
    loaded = load_checkpoint(bf16_dir, torch.device('cpu'), torch.bfloat16)
    return _logits(loaded.model, tokenizer)


# -- the fixtures themselves ----------------------------------------------------------------
def test_fixture_is_a_hybrid_nemotron_h_with_nemotron_tokens(bf16_dir: Path, tokenizer) -> None:
    config = json.loads((bf16_dir / 'config.json').read_text())
    assert config['model_type'] == 'nemotron_h'
    assert config['architectures'] == ['NemotronHForCausalLM']
    assert set(config['hybrid_override_pattern']) == {'M', '*', '-'}
    for tag in ('<|im_start|>', '<|im_end|>', '<think>', '</think>', '<tool_call>',
                '</tool_call>'):
        assert len(tokenizer.encode(tag, add_special_tokens=False)) == 1, tag
    assert tokenizer.eos_token == '<|im_end|>'
    assert '<|im_start|>' in tokenizer.chat_template
    text = 'Go to the kitchen <tool_call>\n<function=say>\n</tool_call>'
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_fp8_fixture_has_modelopt_layout(fp8_dir: Path) -> None:
    config = json.loads((fp8_dir / 'config.json').read_text())
    assert config['quantization_config']['quant_method'] == 'modelopt'
    assert config['quantization_config']['quant_algo'] == 'FP8'
    hf_quant = json.loads((fp8_dir / 'hf_quant_config.json').read_text())
    assert hf_quant['producer']['name'] == 'modelopt'
    assert hf_quant['quantization']['quant_algo'] == 'FP8'
    tensors = load_file(str(fp8_dir / 'model.safetensors'))
    fp8 = [n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn]
    assert fp8 and set(fp8) == set(fp8_tensor_names(fp8_dir))
    kinds = {n.split('.')[-2] for n in fp8}
    assert kinds == {'in_proj', 'out_proj', 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'up_proj',
                     'down_proj'}
    for name in fp8:
        module = name.removesuffix('.weight')
        for scale in ('weight_scale', 'input_scale'):
            value = tensors[f'{module}.{scale}']
            assert value.dtype == torch.float32 and value.shape == (), (module, scale)
    for name in ('lm_head.weight', 'backbone.embeddings.weight', 'backbone.norm_f.weight'):
        assert tensors[name].dtype == torch.bfloat16


# -- loading and FP8 numerics ---------------------------------------------------------------
def test_bf16_loader_matches_transformers_from_pretrained(bf16_dir: Path, tokenizer,
                                                          reference_logits: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(bf16_dir), dtype=torch.bfloat16)
    assert torch.equal(_logits(plain, tokenizer), reference_logits)


def test_fp8_dequantized_logits_match_bf16(fp8_dir: Path, tokenizer,
                                           reference_logits: torch.Tensor) -> None:
    loaded = load_checkpoint(fp8_dir, torch.device('cpu'), torch.bfloat16)
    assert loaded.fp8 == 'dequantized' and loaded.quantized_linears == 18
    assert not any(isinstance(m, FP8Linear) for m in loaded.model.modules())
    logits = _logits(loaded.model, tokenizer)
    assert _relative_error(logits, reference_logits) < FP8_REL_TOL
    assert _cosine(logits, reference_logits) > FP8_MIN_COSINE
    agree = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean()
    assert agree >= 0.75, f'top-1 agreement {agree:.2f}'


def test_dequantization_is_weight_times_scale_rounded_once(fp8_dir: Path) -> None:
    tensors = load_file(str(fp8_dir / 'model.safetensors'))
    loaded = load_checkpoint(fp8_dir, torch.device('cpu'), torch.bfloat16)
    name = 'backbone.layers.0.mixer.in_proj'
    expected = (tensors[f'{name}.weight'].float() * tensors[f'{name}.weight_scale']).bfloat16()
    actual = loaded.model.get_submodule('model.layers.0.mixer.in_proj').weight
    assert torch.equal(actual, expected)


def test_fp8_scaled_mm_path_matches_bf16_on_cpu(fp8_dir: Path, tokenizer,
                                                reference_logits: torch.Tensor) -> None:
    loaded = load_checkpoint(fp8_dir, torch.device('cpu'), torch.bfloat16, fp8='scaled_mm')
    assert loaded.fp8 == 'scaled_mm'
    linears = [m for m in loaded.model.modules() if isinstance(m, FP8Linear)]
    assert len(linears) == 14 and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    # The tiny Mamba in_proj has 328 outputs: _scaled_mm needs multiples of 16, so those four
    # are dequantized instead (the real 4B's 17504 outputs fit).
    in_proj = loaded.model.get_submodule('model.layers.0.mixer.in_proj')
    assert type(in_proj) is torch.nn.Linear and in_proj.weight.dtype == torch.bfloat16
    logits = _logits(loaded.model, tokenizer)
    assert _relative_error(logits, reference_logits) < FP8_REL_TOL
    assert _cosine(logits, reference_logits) > FP8_MIN_COSINE


def test_plain_from_pretrained_is_silently_wrong_on_modelopt_fp8(
        fp8_dir: Path, tokenizer, reference_logits: torch.Tensor) -> None:
    """The hazard the loader exists for: transformers loads raw FP8 values without scales."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(fp8_dir), dtype=torch.bfloat16)
    error = _relative_error(_logits(plain, tokenizer), reference_logits)
    assert error > 10 * FP8_REL_TOL, (
        f'from_pretrained now gets ModelOpt FP8 right ({error:.3f}); revisit the loader')


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / 'config.json').read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / 'config.json').write_text(json.dumps(config))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / 'model.safetensors'))
    edit(tensors)
    save_file(tensors, str(path / 'model.safetensors'))


def test_raw_fp8_without_a_quantization_entry_is_refused(fp8_dir: Path, tmp_path: Path) -> None:
    bare = _copy(fp8_dir, tmp_path / 'bare')
    _edit_config(bare, quantization_config=None)
    (bare / 'hf_quant_config.json').unlink()
    backend = TorchBackend(TorchConfig(**_options(bare)), TOOLS)
    with pytest.raises(BackendError, match='declares no quantization.*without their scales'):
        backend.load()
    assert not backend.loaded


def test_fp8_weight_without_its_scale_is_refused(fp8_dir: Path, tmp_path: Path) -> None:
    broken = _copy(fp8_dir, tmp_path / 'no_scale')
    _edit_tensors(broken, lambda t: t.pop('backbone.layers.2.mixer.q_proj.weight_scale'))
    with pytest.raises(CheckpointError, match='q_proj.weight_scale is missing'):
        load_checkpoint(broken, torch.device('cpu'), torch.bfloat16)


@pytest.mark.parametrize(('config_changes', 'hf_quant', 'message'), [
    ({'quantization_config': {'quant_method': 'gptq', 'bits': 4}}, None,
     "quantization 'gptq'.*not support"),
    ({'quantization_config': {'quant_method': 'fp8', 'weight_block_size': [128, 128]}}, None,
     "quantization 'fp8'.*not support"),
    ({'quantization_config': {'quant_method': 'modelopt', 'quant_algo': 'NVFP4'}}, None,
     "quant_algo 'NVFP4'"),
    ({}, {'producer': {'name': 'modelopt'}, 'quantization': {'quant_algo': 'FP8_PB_WO'}},
     "quant_algo 'FP8_PB_WO'"),
    ({'quantization_config': {'quant_method': 'modelopt', 'quant_algo': 'FP8',
                              'kv_cache_quant_algo': 'NVFP4'}}, None,
     "kv_cache_quant_algo 'NVFP4'"),
    ({'model_type': 'llama'}, None, "model_type 'llama' is not supported"),
])
def test_unknown_quantization_and_models_are_refused(
        fp8_dir: Path, tmp_path: Path, config_changes: dict, hf_quant: dict | None,
        message: str) -> None:
    target = _copy(fp8_dir, tmp_path / 'variant')
    _edit_config(target, **config_changes)
    if hf_quant is not None:
        (target / 'hf_quant_config.json').write_text(json.dumps(hf_quant))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(target, torch.device('cpu'), torch.bfloat16)


def test_per_channel_scales_and_integer_weights_are_refused(fp8_dir: Path,
                                                            tmp_path: Path) -> None:
    name = 'backbone.layers.3.mixer.up_proj'
    per_channel = _copy(fp8_dir, tmp_path / 'per_channel')

    def widen(tensors: dict) -> None:
        rows = tensors[f'{name}.weight'].shape[0]
        tensors[f'{name}.weight_scale'] = tensors[f'{name}.weight_scale'].expand(rows).clone()

    _edit_tensors(per_channel, widen)
    with pytest.raises(CheckpointError, match='one scale per tensor'):
        load_checkpoint(per_channel, torch.device('cpu'), torch.bfloat16)
    integer = _copy(fp8_dir, tmp_path / 'int8')
    _edit_tensors(integer, lambda t: t.update({f'{name}.weight': t[f'{name}.weight'].view(
        torch.int8)}))
    with pytest.raises(CheckpointError, match='dtype I8'):
        load_checkpoint(integer, torch.device('cpu'), torch.bfloat16)


def test_missing_directory_and_files_are_clear_errors(tmp_path: Path, bf16_dir: Path) -> None:
    with pytest.raises(BackendError, match='not a directory'):
        TorchBackend(TorchConfig(**_options(tmp_path / 'nowhere')), TOOLS).load()
    no_weights = tmp_path / 'no_weights'
    no_weights.mkdir()
    shutil.copy(bf16_dir / 'config.json', no_weights)
    with pytest.raises(BackendError, match='no \\*.safetensors'):
        TorchBackend(TorchConfig(**_options(no_weights)), TOOLS).load()


# -- the backend interface ------------------------------------------------------------------
def test_create_backend_with_ros_typed_options(fp8_dir: Path) -> None:
    options = {'model_path': str(fp8_dir), 'device': 'cpu', 'dtype': 'bfloat16', 'fp8': 'auto',
               'n_ctx': 8192, 'n_threads': 1, 'prefill_chunk': 128, 'prefix_cache': True}
    backend = create_backend('torch', TOOLS, options)
    assert isinstance(backend, TorchBackend) and not backend.loaded
    info = backend.load()
    try:
        assert backend.loaded and backend.fp8_mode == 'dequantized'
        assert info.architecture == 'nemotron_h' and info.chat_format == 'nemotron'
        assert info.recurrent and info.n_ctx == 8192 and info.n_vocab == 512
        assert backend.count_tokens('<tool_call>') == 1
        result = backend.generate(GenerationRequest(
            messages=chat('Stop.'), tools=['stop'], tool_choice=ToolChoice.REQUIRED,
            max_tool_calls=1, sampling=SamplingParams(max_tokens=64)))
        assert result.finish_reason is FinishReason.STOP, result.raw_text
        assert [c.name for c in result.tool_calls] == ['stop']
    finally:
        backend.unload()
        backend.unload()
    assert not backend.loaded
    with pytest.raises(BackendError, match='no model is loaded'):
        backend.count_tokens('x')


@pytest.mark.parametrize(('changes', 'message'), [
    ({'dtype': 'float64'}, 'dtype must be one of'),
    ({'fp8': 'always'}, 'fp8 must be one of'),
    ({'device': 'tpu'}, 'device must be'),
    ({'n_ctx': 16}, r'n_ctx must be in \[64, '),
    ({'n_ctx': '4096'}, 'n_ctx must be an integer'),
    ({'prefix_cache': 1}, 'prefix_cache must be a boolean'),
    ({'n_threads': -1}, r'n_threads must be in \[0, '),
    ({'prefill_chunk': 0}, 'prefill_chunk must be an integer >= 1'),
    ({'dtype': 3}, 'dtype must be one of'),
    ({'model_path': ''}, 'model_path must name'),
])
def test_config_errors_name_the_parameter(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TorchConfig(**{'model_path': '/models/x', **changes})


def test_prompt_longer_than_the_context_is_a_request_error(bf16_dir: Path) -> None:
    backend = TorchBackend(TorchConfig(**_options(bf16_dir, n_ctx=64)), TOOLS)
    backend.load()
    with pytest.raises(RequestError, match='the context holds 64'):
        backend.generate(GenerationRequest(messages=chat('Go to the kitchen.'),
                                           tools=['navigate_to']))


def test_xgrammar_reads_the_gbnf_as_llama_cpp_does(tokenizer) -> None:
    """The dialect check: valid native calls pass, everything the GBNF excludes is refused."""
    grammars = GrammarBackend(tokenizer, 512, [11])
    specs = list(TOOLS)
    gbnf = build_grammar(specs, ToolChoice.AUTO)
    valid = [
        ('navigate_to', {'target': 'kitchen', 'speed': 0.25}),
        ('pick', {'object_name': 'red_cup', 'grasp': 'top'}),
        ('say', {'text': 'Hello there, I am on my way.'}),
        ('stop', {}),
        ('move_base', {'linear': -0.3, 'angular': 1, 'duration': 2.5}),
        ('look_at', {'point': {'x': 1.5, 'y': -2, 'z': 0.25}}),
        ('set_waypoints', {'places': ['kitchen', 'entrance'], 'loop': True}),
    ]
    for name, arguments in valid:
        text = render_tool_call(name, arguments)
        state = grammars.start(gbnf, torch.device('cpu'))
        assert state.accepts_text(text) and state.completable, text
    two = render_tool_call('stop', {}) + '\n' + render_tool_call('get_battery', {})
    assert grammars.start(gbnf, torch.device('cpu')).accepts_text(two)
    assert grammars.start(gbnf, torch.device('cpu')).accepts_text('Sure, on my way.')
    invalid = [
        render_tool_call('fly', {}),
        render_tool_call('navigate_to', {'target': 'garage'}),
        render_tool_call('navigate_to', {'target': 'kitchen', 'speed': 0.9}),
        render_tool_call('navigate_to', {'target': 'kitchen', 'speed': 0.25}).replace(
            '0.25', '25e-2'),
        render_tool_call('say', {'text': 'a <b> c'}),
        render_tool_call('move_base', {'linear': 0.1, 'angular': 0.1}),
        render_tool_call('look_at', {'point': {'x': 1, 'y': 2}}),
        '<tool_call>\n<function=stop>\n</function>\n</tool_call>x',
    ]
    for text in invalid:
        state = grammars.start(gbnf, torch.device('cpu'))
        assert not (state.accepts_text(text) and state.completable), text
    thinking = build_grammar(specs, ToolChoice.REQUIRED, thinking=True)
    state = grammars.start(thinking, torch.device('cpu'))
    assert state.accepts_text('The user wants quiet.\n</think>' + render_tool_call('stop', {}))
    assert state.completable


def test_constrained_calls_are_valid_over_50_seeds(backend: TorchBackend) -> None:
    rng = random.Random(7)
    names = list(TOOLS.names)
    subsets = [names, ['navigate_to', 'pick', 'place'], ['move_base', 'look_at', 'stop']]
    returned, called = 0, set()
    for seed in range(50):
        allowed = subsets[seed * len(subsets) // 50]  # grouped, so the prefix is reused
        choice = ToolChoice.REQUIRED if seed % 2 else ToolChoice.AUTO
        result = backend.generate(GenerationRequest(
            messages=chat(rng.choice(['Bring the red cup to the table.', 'Look left.',
                                      'Drive forward a bit.'])),
            tools=allowed, tool_choice=choice, enable_thinking=seed % 10 == 9,
            sampling=SamplingParams(temperature=1.0, seed=seed, max_tokens=160)))
        # The grammar admits only well-formed calls; validation may still drop one whose
        # number meets an exclusive bound the grammar keeps loose.
        calls = checked_calls(result, allowed, choice, malformed=('block',))
        called.update(call.name for call in calls)
        returned += len(calls)
    assert returned >= 15, f'only {returned} valid calls in 50 generations'
    assert len(called) >= 4, f'too few distinct tools exercised: {called}'


def test_cut_calls_are_never_returned(backend: TorchBackend) -> None:
    result = backend.generate(GenerationRequest(
        messages=chat('Say hello.'), tools=['say'], tool_choice=ToolChoice.REQUIRED,
        sampling=SamplingParams(temperature=1.0, seed=3, max_tokens=12)))
    assert result.finish_reason is FinishReason.LENGTH
    assert result.tool_calls == []
    assert result.rejected and 'incomplete tool calls dropped' in result.rejected[0]


def test_streamed_text_is_the_raw_text_and_usage_is_filled(backend: TorchBackend) -> None:
    pieces: list[str] = []
    result = backend.generate(GenerationRequest(
        messages=chat('Tell me about the kitchen.'), constrained=False,
        sampling=SamplingParams(temperature=1.0, seed=5, max_tokens=40, ignore_eos=True),
        on_token=pieces.append))
    assert result.finish_reason is FinishReason.LENGTH
    assert ''.join(pieces) == result.raw_text and len(pieces) > 10
    usage = result.usage
    assert usage.completion_tokens == 40 and usage.prompt_tokens > 10
    assert 0 < usage.prefill_s <= usage.time_to_first_token_s <= usage.total_s
    assert usage.decode_s > 0 and usage.tokens_per_second > 0


def test_prefix_reuse_and_chunked_prefill_do_not_change_the_answer(bf16_dir: Path) -> None:
    request = GenerationRequest(messages=chat('Bring the red cup to the table.'),
                                tools=['navigate_to', 'pick', 'say'], constrained=False,
                                sampling=SamplingParams(max_tokens=24, ignore_eos=True))
    answers = []
    for extra in ({'prefix_cache': False, 'prefill_chunk': 4096},
                  {'prefix_cache': True, 'prefill_chunk': 37}):
        backend = TorchBackend(TorchConfig(**_options(bf16_dir, **extra)), TOOLS)
        backend.load()
        first, second = backend.generate(request), backend.generate(request)
        assert first.raw_text == second.raw_text
        answers.append(first.raw_text)
        if extra['prefix_cache']:
            assert first.usage.prompt_tokens_reused == 0
            assert 0 < second.usage.prompt_tokens_reused < second.usage.prompt_tokens
        backend.unload()
    assert answers[0] == answers[1]


def test_offered_tools_keep_the_prefix_while_the_grammar_narrows(backend: TorchBackend) -> None:
    results = [backend.generate(GenerationRequest(
        messages=chat('Stop now.'), tools=[name], offered_tools=TOOLS.names,
        tool_choice=ToolChoice.REQUIRED, max_tool_calls=1,
        sampling=SamplingParams(temperature=1.0, seed=11, max_tokens=96)))
        for name in ('stop', 'get_battery', 'stop')]
    assert results[1].usage.prompt_tokens_reused > 0
    assert results[2].usage.prompt_tokens_reused > 0
    for name, result in zip(('stop', 'get_battery', 'stop'), results, strict=True):
        assert result.finish_reason is FinishReason.STOP, result.raw_text
        assert [c.name for c in result.tool_calls] == [name]


def test_long_generation_returns_by_its_deadline(backend: TorchBackend) -> None:
    budget = 0.4
    start = time.monotonic()
    result = backend.generate(GenerationRequest(
        messages=chat('Tell me a long story.'), constrained=False,
        sampling=SamplingParams(max_tokens=100_000, ignore_eos=True), deadline=start + budget))
    elapsed = time.monotonic() - start
    assert result.finish_reason is FinishReason.DEADLINE
    assert result.usage.completion_tokens > 3
    assert elapsed < budget + 0.5, f'returned {elapsed - budget:.3f} s after the deadline'


def test_long_prefill_is_interrupted_by_the_deadline(bf16_dir: Path) -> None:
    backend = TorchBackend(TorchConfig(**_options(bf16_dir, prefill_chunk=64, n_ctx=8192,
                                                  prefix_cache=False)), TOOLS)
    backend.load()
    long_text = ' '.join(f'observation {i}: the corridor is clear.' for i in range(180))
    request = GenerationRequest(messages=chat(long_text), constrained=False,
                                sampling=SamplingParams(max_tokens=4))
    assert backend.count_tokens(long_text) > 4000
    start = time.monotonic()
    request.deadline = start + 0.1
    result = backend.generate(request)
    interrupted = time.monotonic() - start
    assert result.finish_reason is FinishReason.DEADLINE
    assert result.usage.completion_tokens == 0 and result.raw_text == ''
    request.deadline = None
    start = time.monotonic()
    full = backend.generate(request)
    uninterrupted = time.monotonic() - start
    # Without a deadline the answer ends by itself: a random-weight model may stop or fill
    # max_tokens, and either shows the prompt was evaluated in full.
    assert full.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert interrupted < uninterrupted / 2, (interrupted, uninterrupted)


def test_cancel_from_another_thread(backend: TorchBackend) -> None:
    token = CancelToken()
    timer = threading.Timer(0.2, token.cancel)
    timer.start()
    start = time.monotonic()
    result = backend.generate(GenerationRequest(
        messages=chat('Keep talking.'), constrained=False, cancel=token,
        sampling=SamplingParams(max_tokens=100_000, ignore_eos=True)))
    timer.join()
    assert result.finish_reason is FinishReason.CANCELLED
    assert time.monotonic() - start < 1.5
    assert result.tool_calls == []


def test_cancelled_before_start_evaluates_nothing(backend: TorchBackend) -> None:
    token = CancelToken()
    token.cancel(FinishReason.DEADLINE)
    result = backend.generate(GenerationRequest(
        messages=chat('Go to the kitchen.'), tools=['navigate_to'], cancel=token))
    assert result.finish_reason is FinishReason.DEADLINE
    assert result.usage.completion_tokens == 0 and result.raw_text == ''


# -- the FP8 tensor-core path ---------------------------------------------------------------
def _fp8_gpu_reason() -> str:
    if not torch.cuda.is_available():
        return 'no CUDA device (the FP8 matmul path needs compute capability >= 8.9)'
    major, minor = torch.cuda.get_device_capability()
    if not fp8_matmul_supported(torch.device('cuda')):
        return f'CUDA device has compute capability {major}.{minor}; FP8 needs >= 8.9'
    return ''


@pytest.mark.skipif(bool(_fp8_gpu_reason()), reason=_fp8_gpu_reason() or 'n/a')
def test_fp8_scaled_mm_on_gpu(fp8_dir: Path, bf16_dir: Path, tokenizer) -> None:
    device = torch.device('cuda')
    reference = load_checkpoint(bf16_dir, device, torch.bfloat16)
    fp8 = load_checkpoint(fp8_dir, device, torch.bfloat16)
    assert fp8.fp8 == 'scaled_mm'
    assert any(isinstance(m, FP8Linear) for m in fp8.model.modules())
    expected, logits = _logits(reference.model, tokenizer), _logits(fp8.model, tokenizer)
    assert _relative_error(logits, expected) < FP8_REL_TOL
    assert _cosine(logits, expected) > FP8_MIN_COSINE
    backend = TorchBackend(TorchConfig(model_path=str(fp8_dir), device='cuda'), TOOLS)
    backend.load()
    try:
        assert backend.fp8_mode == 'scaled_mm'
        result = backend.generate(GenerationRequest(
            messages=chat('Go to the kitchen.'), tools=['navigate_to'],
            tool_choice=ToolChoice.REQUIRED, max_tool_calls=1,
            sampling=SamplingParams(max_tokens=64)))
    finally:
        backend.unload()
    assert result.finish_reason is FinishReason.STOP, result.raw_text
    assert [c.name for c in result.tool_calls] == ['navigate_to']
