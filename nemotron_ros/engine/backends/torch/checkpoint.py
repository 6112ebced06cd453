"""Load a Hugging Face NemotronH checkpoint directory into a ready model, checking every tensor.

Why not ``from_pretrained``: for a ModelOpt FP8 checkpoint it silently loads FP8 values
without their scales (see :mod:`.modelopt_fp8`), and for any checkpoint whose safetensors hold
FP8 tensors without a quantization entry it does the same. This loader builds the
transformers NemotronH module tree on the ``meta`` device, streams the safetensors itself,
maps the on-disk names (``backbone.*``) onto the module names (``model.*``), dequantizes or
keeps FP8 as :func:`load_checkpoint` is told, and refuses anything it cannot account for:
unknown quantization, FP8 tensors without scales, integer weights, missing or unexpected
tensors, or a tensor whose shape differs from the module's. The modelling code itself stays
transformers' own (Mamba-2 in pure PyTorch unless ``mamba_ssm`` is installed).

Only local directories are read; nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ... import settings
from .modelopt_fp8 import (
    KV_SCALE_SUFFIXES,
    FP8Linear,
    QuantizationError,
    QuantScheme,
    check_scale,
    dequantize,
    fp8_matmul_supported,
    read_quant_scheme,
)

SUPPORTED_MODEL_TYPES = ('nemotron_h',)
_SCALE_SUFFIXES = ('.weight_scale', '.input_scale')
_IGNORED_PREFIXES = ('mtp.',)
"""Multi-token-prediction heads, which transformers' NemotronH does not build either."""


class CheckpointError(ValueError):
    """The directory is not a loadable checkpoint; the message names the path and the cause."""


@dataclass
class LoadedCheckpoint:
    """A model ready for inference and how it was loaded.

    :param fp8: ``'none'`` (not an FP8 checkpoint), ``'dequantized'`` or ``'scaled_mm'``.
    :param quantized_linears: Linears stored as FP8 in the checkpoint.
    """

    model: nn.Module
    config: Any
    quant: QuantScheme
    fp8: str
    quantized_linears: int


def load_checkpoint(model_dir: str | Path, device: torch.device, dtype: torch.dtype,
                    fp8: str = 'auto') -> LoadedCheckpoint:
    """Build the model in ``model_dir`` on ``device`` with ``dtype`` activations and weights.

    :param fp8: for ModelOpt FP8 checkpoints: ``'auto'`` keeps FP8 and uses scaled matmuls
        where the device has FP8 tensor cores and dequantizes elsewhere; ``'dequantize'``
        always dequantizes; ``'scaled_mm'`` always keeps FP8 (also on a CPU, for tests).
    :raises CheckpointError: anything wrong with the directory (see the module docstring).
    """
    path = Path(model_dir)
    settings.check('fp8', fp8)
    raw_config = _read_config(path)
    try:
        quant = read_quant_scheme(path, raw_config)
    except QuantizationError as exc:
        raise CheckpointError(str(exc)) from exc
    headers = _tensor_index(path)
    fp8_names = [n for n, (_, kind, _) in headers.items() if kind.startswith('F8')]
    if fp8_names and not quant.quantized:
        raise CheckpointError(
            f'{path}: {len(fp8_names)} tensors are stored as FP8 (e.g. {fp8_names[0]}) but '
            'config.json declares no quantization: refusing to use raw FP8 values without '
            "their scales (transformers' from_pretrained would load them silently and wrong)")
    bad = [n for n, (_, kind, _) in headers.items() if kind not in _FLOAT_KINDS]
    if bad:
        kind = headers[bad[0]][1]
        raise CheckpointError(f'{path}: tensor {bad[0]} has dtype {kind}; only float tensors '
                              f'and ModelOpt FP8 (F8_E4M3) are supported')
    keep_fp8 = quant.quantized and (fp8 == 'scaled_mm' or (
        fp8 == 'auto' and fp8_matmul_supported(device)))
    config = _build_config(raw_config, path, dtype)
    with torch.device('meta'):
        model = _model_class()(config)
    scales = _read_scales(headers)
    quantized = _quantized_modules(headers, scales, path)
    kept = _swap_in_fp8_linears(model, quantized, path) if keep_fp8 else set()
    state = dict(_load_tensors(headers, quantized, kept, device, dtype))
    _assign(model, state, config, path)
    model.eval()
    mode = 'none' if not quant.quantized else ('scaled_mm' if keep_fp8 else 'dequantized')
    return LoadedCheckpoint(model=model, config=config, quant=quant, fp8=mode,
                            quantized_linears=len(quantized))


_FLOAT_KINDS = ('BF16', 'F16', 'F32', 'F64', 'F8_E4M3')


def module_name(on_disk: str) -> str:
    """The module path of an on-disk tensor name (``backbone.x`` -> ``model.x``)."""
    return 'model.' + on_disk[len('backbone.'):] if on_disk.startswith('backbone.') else on_disk


def _read_config(path: Path) -> dict[str, Any]:
    file = path / 'config.json'
    if not path.is_dir():
        raise CheckpointError(f'{path}: not a directory (the torch backend loads a local '
                              'Hugging Face checkpoint directory)')
    try:
        config = json.loads(file.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise CheckpointError(f'{path}: no config.json (not a Hugging Face checkpoint)') from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f'{file}: unreadable: {exc}') from exc
    model_type = config.get('model_type')
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f'{path}: model_type {model_type!r} is not supported by the torch '
                              f'backend (supported: {", ".join(SUPPORTED_MODEL_TYPES)})')
    return config


def _model_class() -> type[nn.Module]:
    from transformers import NemotronHForCausalLM

    return NemotronHForCausalLM


def _build_config(raw: Mapping[str, Any], path: Path, dtype: torch.dtype) -> Any:
    from transformers import NemotronHConfig

    fields = {k: v for k, v in raw.items() if k != 'quantization_config'}
    try:
        config = NemotronHConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f'{path}/config.json: not a valid NemotronH config: {exc}') from exc
    config.dtype = dtype
    config._attn_implementation = 'sdpa'
    return config


def _tensor_index(path: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """name -> (file, safetensors dtype, shape) over every shard, from the headers only."""
    index_file = path / 'model.safetensors.index.json'
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding='utf-8'))['weight_map']
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f'{index_file}: unreadable: {exc}') from exc
        files = sorted({path / name for name in weight_map.values()})
    else:
        files = sorted(path.glob('*.safetensors'))
    if not files:
        raise CheckpointError(f'{path}: no *.safetensors weights (only safetensors is read)')
    headers: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for file in files:
        for name, (kind, shape) in _safetensors_header(file).items():
            if name.startswith(_IGNORED_PREFIXES):
                continue
            if name in headers:
                raise CheckpointError(f'{path}: tensor {name} appears in two files')
            headers[name] = (file, kind, shape)
    return headers


def _safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    try:
        with file.open('rb') as stream:
            size = int.from_bytes(stream.read(8), 'little')
            header = json.loads(stream.read(size))
    except FileNotFoundError:
        raise CheckpointError(f'{file}: missing (named by the index)') from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f'{file}: not a safetensors file: {exc}') from exc
    return {name: (str(info['dtype']), tuple(info['shape']))
            for name, info in header.items() if name != '__metadata__'}


def _read_scales(headers: Mapping[str, tuple[Path, str, tuple[int, ...]]]
                 ) -> dict[str, torch.Tensor]:
    names = [n for n in headers if n.endswith(_SCALE_SUFFIXES + KV_SCALE_SUFFIXES)]
    return dict(_read(headers, names, torch.device('cpu')))


def _quantized_modules(headers: Mapping[str, tuple[Path, str, tuple[int, ...]]],
                       scales: Mapping[str, torch.Tensor], path: Path) -> dict[str, tuple]:
    """On-disk module name -> (weight scale, input scale) for every FP8 weight, all checked."""
    quantized: dict[str, tuple] = {}
    for name, (_, kind, shape) in headers.items():
        if not kind.startswith('F8'):
            continue
        if not name.endswith('.weight') or len(shape) != 2:
            raise CheckpointError(f'{path}: FP8 tensor {name} is not a Linear weight; ModelOpt '
                                  'FP8 quantizes Linear weights only')
        module = name.removesuffix('.weight')
        try:
            quantized[module] = (check_scale(f'{module}.weight_scale',
                                             scales.get(f'{module}.weight_scale')),
                                 check_scale(f'{module}.input_scale',
                                             scales.get(f'{module}.input_scale')))
        except QuantizationError as exc:
            raise CheckpointError(f'{path}: {exc}') from exc
    for name in scales:
        if name.endswith(_SCALE_SUFFIXES) and name.rsplit('.', 1)[0] not in quantized:
            raise CheckpointError(f'{path}: {name} belongs to no FP8 weight (the weight is '
                                  'stored unquantized or missing)')
    return quantized


def _swap_in_fp8_linears(model: nn.Module, quantized: Mapping[str, tuple],
                         path: Path) -> set[str]:
    """Replace the Linears of FP8 weights by :class:`FP8Linear`; returns those replaced.

    A Linear whose sizes ``_scaled_mm`` cannot take stays a BF16 Linear (dequantized).
    """
    kept = set()
    for on_disk in quantized:
        name = module_name(on_disk)
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child, None)
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f'{path}: FP8 weight {on_disk} is not the weight of a Linear')
        if not FP8Linear.fits(linear.in_features, linear.out_features):
            continue
        setattr(parent, child, FP8Linear(linear.in_features, linear.out_features,
                                         bias=linear.bias is not None,
                                         device=torch.device('meta')))
        kept.add(on_disk)
    return kept


def _load_tensors(headers: Mapping[str, tuple[Path, str, tuple[int, ...]]],
                  quantized: Mapping[str, tuple], kept: set[str], device: torch.device,
                  dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(module-side name, tensor) pairs, FP8 weights dequantized or kept as decided."""
    names = [n for n in headers if not n.endswith(_SCALE_SUFFIXES + KV_SCALE_SUFFIXES)]
    for name, tensor in _read(headers, names, device):
        module = name.removesuffix('.weight')
        target = module_name(name)
        if module in quantized:
            weight_scale, input_scale = quantized[module]
            if module in kept:
                yield target, tensor.clone() if tensor.device.type == 'cpu' else tensor
                yield module_name(module) + '.weight_scale', weight_scale.to(device)
                yield module_name(module) + '.input_scale', input_scale.to(device)
            else:
                yield target, dequantize(tensor, weight_scale, dtype)
        else:
            # A CPU tensor of the right dtype would stay a view of the memory-mapped file,
            # read from disk on first use: copy, so that a loaded model is in memory.
            yield target, tensor.to(dtype, copy=tensor.device.type == 'cpu')


def _read(headers: Mapping[str, tuple[Path, str, tuple[int, ...]]], names: list[str],
          device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(headers[name][0], []).append(name)
    target = 'cpu' if device.type == 'cpu' else str(device)
    for file, file_names in by_file.items():
        with safe_open(str(file), framework='pt', device=target) as handle:
            for name in file_names:
                yield name, handle.get_tensor(name)


def _assign(model: nn.Module, state: dict[str, torch.Tensor], config: Any, path: Path) -> None:
    expected = model.state_dict()
    tied = getattr(config, 'tie_word_embeddings', False)
    if tied and 'lm_head.weight' not in state and 'model.embeddings.weight' in state:
        state['lm_head.weight'] = state['model.embeddings.weight']
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f'{path}: the weights do not match the config: missing '
                              f'{_few(missing)}; unexpected {_few(unexpected)}')
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f'{path}: tensor {name} has shape {tuple(tensor.shape)}, the '
                                  f'config implies {tuple(expected[name].shape)}')
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f'{path}: no value for {_few(leftover)}')
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return 'none'
    more = f' and {len(names) - limit} more' if len(names) > limit else ''
    return ', '.join(names[:limit]) + more


def fp8_tensor_names(model_dir: str | Path) -> list[str]:
    """Names of the FP8 tensors in a checkpoint (headers only; for tests and diagnostics)."""
    return [n for n, (_, kind, _) in _tensor_index(Path(model_dir)).items()
            if kind.startswith('F8')]
