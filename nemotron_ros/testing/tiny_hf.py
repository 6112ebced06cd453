"""Tiny Hugging Face NemotronH checkpoints (BF16 and ModelOpt FP8), made at test time.

Why: the torch backend must be tested on the real transformers NemotronH code path (Mamba-2,
attention and MLP layers, the hybrid cache) and on the real ModelOpt FP8 file layout, without
downloading the 8 GB checkpoint. The checkpoint is *converted* from the project's tiny random
``nemotron_h`` GGUF (:mod:`nemotron_ros.testing.tiny_gguf`), so both backends run the very same
weights and tokenizer: a result of one can be compared with the other, and the GGUF's
``printable_only`` bias channel keeps random output to printable ASCII here too.

The directory looks like a real NVIDIA release:

* ``config.json`` (``NemotronHForCausalLM``, ``hybrid_override_pattern``), ``model.safetensors``
  with the on-disk ``backbone.*`` names, ``generation_config.json``;
* a byte-level BPE ``tokenizer.json`` (the GGUF's tokens and merges) with ``<|im_end|>`` as
  eos, ``<s>``/``<|im_start|>``/``<|im_end|>`` as special tokens and ``<think>``, ``</think>``,
  ``<tool_call>``, ``</tool_call>`` as plain added tokens (they decode as text), plus the ChatML
  chat template;
* for FP8, ModelOpt's layout: every Linear of the layers (Mamba ``in_proj``/``out_proj``,
  attention ``q/k/v/o_proj``, MLP ``up/down_proj``) stored as ``float8_e4m3fn`` ``weight`` =
  W / ``weight_scale`` with fp32 scalar ``weight_scale`` and ``input_scale`` (calibrated on a
  few chat prompts, as ModelOpt's max calibration does); embeddings, norms, conv1d, ``A_log``,
  ``D``, ``dt_bias`` and ``lm_head`` stay BF16; ``config.json`` carries
  ``quantization_config`` (``quant_method: modelopt``, ``quant_algo: FP8``) and
  ``hf_quant_config.json`` says the same.

Directories are written under a temporary name and renamed, so concurrent test workers never
see a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nemotron_ros.testing.models import tiny_nemotron_h_path

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""

FP8_QUANT_CONFIG: Mapping[str, Any] = {
    'quant_method': 'modelopt',
    'quant_algo': 'FP8',
    'kv_cache_quant_algo': None,
    'exclude_modules': ['lm_head'],
}

CALIBRATION_PROMPTS: tuple[str, ...] = (
    '<|im_start|>system\nYou are the language interface of a mobile robot.<|im_end|>\n'
    '<|im_start|>user\nBring the red cup to the kitchen table.<|im_end|>\n'
    '<|im_start|>assistant\n<think></think>',
    '<|im_start|>user\nGo to the charging dock and say the battery level.<|im_end|>\n'
    '<|im_start|>assistant\n<think>\nThe user wants me to move.</think>'
    '<tool_call>\n<function=navigate_to>\n<parameter=target>\ncharging_dock\n</parameter>\n'
    '</function>\n</tool_call>',
)

MID_HF_PRESET: Mapping[str, object] = MappingProxyType({'n_embd': 1024, 'n_layer': 8,
                                                       'dtype': 'f16'})
"""A ~57M-parameter random NemotronH (hidden 1024, 8 layers) for benchmarks."""

_CONTROL, _USER_DEFINED, _UNKNOWN = 3, 4, 2
_QUANTIZED_SUFFIXES = ('mixer.in_proj', 'mixer.out_proj', 'mixer.q_proj', 'mixer.k_proj',
                       'mixer.v_proj', 'mixer.o_proj', 'mixer.up_proj', 'mixer.down_proj')


def tiny_hf_path(directory: str | os.PathLike[str], *, fp8: bool = False,
                 **gguf_kwargs: object) -> Path:
    """A tiny NemotronH checkpoint directory in ``directory``, built on first use.

    :param fp8: the ModelOpt FP8 variant of the same weights (else BF16).
    :param gguf_kwargs: passed to ``build_tiny_nemotron_h`` (sizes, seed, pattern...); the
        directory name holds a hash of them, so variants can share ``directory``.
    """
    key = json.dumps(gguf_kwargs, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(directory)
    bf16 = root / f'tiny-nemotron-h-hf-{digest}-bf16'
    if not (bf16 / 'config.json').is_file():
        gguf_path = tiny_nemotron_h_path(root, **gguf_kwargs)
        _atomic_dir(bf16, lambda tmp: convert_gguf_to_hf(gguf_path, tmp))
    if not fp8:
        return bf16
    quantized = root / f'tiny-nemotron-h-hf-{digest}-fp8'
    if not (quantized / 'config.json').is_file():
        _atomic_dir(quantized, lambda tmp: quantize_modelopt_fp8(bf16, tmp))
    return quantized


def convert_gguf_to_hf(gguf_path: str | os.PathLike[str],
                       out_dir: str | os.PathLike[str]) -> Path:
    """Write the ``nemotron_h`` GGUF at ``gguf_path`` as a BF16 Hugging Face checkpoint."""
    import gguf
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _hf_config(meta)
    (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    (out / 'generation_config.json').write_text(json.dumps({
        'bos_token_id': config['bos_token_id'], 'eos_token_id': [config['eos_token_id']],
        'pad_token_id': config['pad_token_id'], 'do_sample': True, 'temperature': 0.6,
        'top_p': 0.95}, indent=2) + '\n')
    tensors = {name: torch.from_numpy(array.copy()).to(torch.bfloat16).contiguous()
               for name, array in _hf_tensors(reader, config)}
    save_file(tensors, str(out / 'model.safetensors'), metadata={'format': 'pt'})
    _save_tokenizer(meta, out)
    return out


def quantize_modelopt_fp8(bf16_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                          prompts: Sequence[str] = CALIBRATION_PROMPTS) -> Path:
    """Write the BF16 checkpoint in ``bf16_dir`` in ModelOpt's FP8 layout (see module doc).

    Weight scales are per-tensor ``amax / 448``; input scales come from the largest absolute
    input each Linear sees while the BF16 model reads ``prompts``.
    """
    import torch
    from safetensors.torch import load_file, save_file

    src, out = Path(bf16_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    input_amax = _calibrate(src, prompts)
    tensors = load_file(str(src / 'model.safetensors'))
    quantized: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module = name.removesuffix('.weight')
        if name.endswith('.weight') and module.endswith(_QUANTIZED_SUFFIXES):
            weight = tensor.float()
            scale = weight.abs().max().clamp(min=1e-12) / FP8_MAX
            quantized[name] = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            quantized[f'{module}.weight_scale'] = scale.reshape(())
            amax = input_amax[module.replace('backbone.', 'model.', 1)]
            quantized[f'{module}.input_scale'] = torch.tensor(max(amax, 1e-6) / FP8_MAX)
        else:
            quantized[name] = tensor
    save_file(quantized, str(out / 'model.safetensors'), metadata={'format': 'pt'})
    for item in src.iterdir():
        if item.name not in ('model.safetensors', 'config.json'):
            shutil.copy2(item, out / item.name)
    config = json.loads((src / 'config.json').read_text())
    config['quantization_config'] = dict(FP8_QUANT_CONFIG)
    (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    (out / 'hf_quant_config.json').write_text(json.dumps({
        'producer': {'name': 'modelopt', 'version': '0.0.0+nemotron_ros.testing'},
        'quantization': {k: v for k, v in FP8_QUANT_CONFIG.items() if k != 'quant_method'},
    }, indent=2) + '\n')
    return out


def _calibrate(model_dir: Path, prompts: Sequence[str]) -> dict[str, float]:
    """Largest absolute input of every Linear in the layers over ``prompts``."""
    import torch
    from transformers import AutoTokenizer

    from nemotron_ros.engine.backends.torch.checkpoint import load_checkpoint

    model = load_checkpoint(model_dir, device=torch.device('cpu'),
                            dtype=torch.bfloat16).model
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    amax: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(_QUANTIZED_SUFFIXES):
            def record(_: torch.nn.Module, args: tuple, key: str = name) -> None:
                amax[key] = max(amax.get(key, 0.0), float(args[0].abs().max()))
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            for prompt in prompts:
                ids = tokenizer(prompt, add_special_tokens=False, return_tensors='pt').input_ids
                model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return amax


def _hf_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    from transformers import NemotronHConfig

    arch = meta['general.architecture']
    if arch != 'nemotron_h':
        raise ValueError(f"expected a 'nemotron_h' GGUF, got architecture {arch!r}")

    def key(name: str) -> Any:
        return meta[f'{arch}.{name}']

    ff, kv = key('feed_forward_length'), key('attention.head_count_kv')
    pattern = ''.join('*' if h else ('-' if f else 'M') for f, h in zip(ff, kv, strict=True))
    n_kv = max(kv)
    ssm_heads = key('ssm.time_step_rank')
    config = NemotronHConfig(
        vocab_size=len(meta['tokenizer.ggml.tokens']),
        hidden_size=key('embedding_length'),
        layers_block_type=NemotronHConfig._pattern_to_list(pattern),
        num_attention_heads=key('attention.head_count'),
        num_key_value_heads=n_kv or 1,
        head_dim=key('attention.key_length'),
        intermediate_size=max(ff) or 4 * key('embedding_length'),
        mamba_num_heads=ssm_heads,
        mamba_head_dim=key('ssm.inner_size') // ssm_heads,
        ssm_state_size=key('ssm.state_size'),
        n_groups=key('ssm.group_count'),
        conv_kernel=key('ssm.conv_kernel'),
        max_position_embeddings=key('context_length'),
        layer_norm_epsilon=float(f"{key('attention.layer_norm_rms_epsilon'):.6g}"),
        # llama.cpp does not clamp dt; no lower limit keeps both runtimes on the same maths.
        time_step_min=0.0,
        bos_token_id=meta['tokenizer.ggml.bos_token_id'],
        eos_token_id=meta['tokenizer.ggml.eos_token_id'],
        pad_token_id=meta['tokenizer.ggml.unknown_token_id'],
        tie_word_embeddings=False,
    )
    data = config.to_diff_dict()
    data.pop('layers_block_type', None)
    data['hybrid_override_pattern'] = pattern
    data['architectures'] = ['NemotronHForCausalLM']
    data['dtype'] = 'bfloat16'
    return data


def _hf_tensors(reader: Any, config: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(on-disk HF name, numpy array) for every GGUF tensor."""
    import numpy as np

    names = {'token_embd.weight': 'backbone.embeddings.weight',
             'output_norm.weight': 'backbone.norm_f.weight',
             'output.weight': 'lm_head.weight'}
    per_layer = {
        'attn_norm.weight': 'norm.weight', 'ssm_in.weight': 'mixer.in_proj.weight',
        'ssm_conv1d.weight': 'mixer.conv1d.weight', 'ssm_conv1d.bias': 'mixer.conv1d.bias',
        'ssm_dt.bias': 'mixer.dt_bias', 'ssm_a': 'mixer.A_log', 'ssm_d': 'mixer.D',
        'ssm_norm.weight': 'mixer.norm.weight', 'ssm_out.weight': 'mixer.out_proj.weight',
        'attn_q.weight': 'mixer.q_proj.weight', 'attn_k.weight': 'mixer.k_proj.weight',
        'attn_v.weight': 'mixer.v_proj.weight', 'attn_output.weight': 'mixer.o_proj.weight',
        'ffn_up.weight': 'mixer.up_proj.weight', 'ffn_down.weight': 'mixer.down_proj.weight',
    }
    for tensor in reader.tensors:
        array = np.asarray(tensor.data, dtype=np.float32)
        if tensor.name in names:
            yield names[tensor.name], array
            continue
        _, layer, rest = tensor.name.split('.', 2)
        if rest == 'ssm_a':  # GGUF keeps A = -exp(A_log)
            array = np.log(-array)
        if rest == 'ssm_conv1d.weight':  # depthwise Conv1d: (channels, 1, kernel)
            array = array[:, None, :]
        if rest in ('ssm_a', 'ssm_d', 'ssm_norm.weight'):
            array = array.reshape(-1)
        yield f'backbone.layers.{layer}.{per_layer[rest]}', array


def _save_tokenizer(meta: Mapping[str, Any], out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(meta['tokenizer.ggml.tokens'])
    types = list(meta['tokenizer.ggml.token_type'])
    merges = [tuple(m.split(' ', 1)) for m in meta['tokenizer.ggml.merges']]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types, strict=True)
                                if kind in (_CONTROL, _UNKNOWN)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED])

    def token(key: str) -> str:
        return tokens[meta[f'tokenizer.ggml.{key}_token_id']]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token('bos'), eos_token=token('eos'),
        unk_token=token('unknown'), pad_token=token('unknown'), add_bos_token=False,
        model_max_length=int(meta['nemotron_h.context_length']))
    tokenizer.chat_template = meta['tokenizer.chat_template']
    tokenizer.save_pretrained(str(out))


def _atomic_dir(target: Path, write: Any) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.', dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / 'config.json').is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

