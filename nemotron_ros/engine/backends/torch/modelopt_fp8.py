"""NVIDIA ModelOpt FP8 checkpoints: recognise the format, refuse its relatives, run it two ways.

Why this exists: transformers has no ``modelopt`` quantizer. Given such a checkpoint,
``from_pretrained`` loads the raw ``float8_e4m3fn`` values into BF16 Linears without their
scales and only logs a warning, so the model answers garbage. This module is the part of the
torch backend that knows the format exactly and refuses everything else:

* the format is ``quant_method: modelopt`` / ``quant_algo: FP8`` (in ``config.json``'s
  ``quantization_config`` and/or ``hf_quant_config.json``): each quantized Linear stores
  ``weight`` = W / ``weight_scale`` as float8_e4m3fn with an fp32 *scalar* ``weight_scale``
  and a static fp32 *scalar* ``input_scale``; everything else keeps its float dtype;
* other quantization methods (GPTQ, AWQ, bitsandbytes, compressed-tensors, transformers'
  own block-wise ``fp8``) and other ModelOpt algorithms (``NVFP4``, per-channel or
  per-block FP8) are refused with an error that says what was found and what is supported;
* on a GPU with FP8 tensor cores (CUDA compute capability >= 8.9: Ada, Hopper, Blackwell,
  Thor) the weights stay FP8 and :class:`FP8Linear` runs ``torch._scaled_mm`` with the static
  scales, as TensorRT-LLM and vLLM do; everywhere else (CPU, Jetson Orin's sm_87) they are
  dequantized once at load (W = fp8 * scale, then BF16): FP8 kept in memory on a CPU is about
  50x slower than BF16, because converting it back dominates every matmul.

The FP8 KV-cache scales (``k_scale``/``v_scale``) of ``kv_cache_quant_algo: FP8`` are not
used: the cache stays in the compute dtype, which is at least as accurate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
MIN_CAPABILITY = (8, 9)
"""CUDA compute capability of the first GPUs with FP8 tensor cores (Ada Lovelace)."""

SUPPORTED = ("BF16/FP16/FP32 checkpoints and ModelOpt FP8 (quant_method 'modelopt', "
             "quant_algo 'FP8')")
KV_SCALE_SUFFIXES = ('.k_scale', '.v_scale')


class QuantizationError(ValueError):
    """A checkpoint's quantization is unknown, unsupported or inconsistent with its tensors."""


@dataclass(frozen=True)
class QuantScheme:
    """How a checkpoint says it is quantized.

    :param method: ``'none'`` or ``'modelopt-fp8'``.
    :param exclude_modules: modules ModelOpt left unquantized (informational: the tensors'
        dtypes decide, and are checked against the scales present).
    :param source: the file(s) that declared it, for messages.
    """

    method: str = 'none'
    exclude_modules: tuple[str, ...] = ()
    kv_cache_quant_algo: Optional[str] = None
    source: str = ''

    @property
    def quantized(self) -> bool:
        return self.method != 'none'


def read_quant_scheme(model_dir: Path, config: Mapping[str, Any]) -> QuantScheme:
    """The quantization declared by ``config.json`` (already parsed) and ``hf_quant_config.json``.

    :raises QuantizationError: a method or algorithm other than ModelOpt FP8, or the two
        files disagreeing.
    """
    declared: dict[str, tuple[str, str, Mapping[str, Any]]] = {}
    section = config.get('quantization_config')
    if section is not None:
        if not isinstance(section, Mapping):
            raise QuantizationError(f'{model_dir}/config.json: quantization_config must be an '
                                    f'object, got {type(section).__name__}')
        declared['config.json'] = (str(section.get('quant_method', '')).lower(),
                                   str(section.get('quant_algo', '')), section)
    hf_file = model_dir / 'hf_quant_config.json'
    if hf_file.is_file():
        try:
            data = json.loads(hf_file.read_text(encoding='utf-8'))
        except (OSError, ValueError) as exc:
            raise QuantizationError(f'{hf_file}: unreadable: {exc}') from exc
        producer = str((data.get('producer') or {}).get('name', 'modelopt')).lower()
        quantization = data.get('quantization') or {}
        declared['hf_quant_config.json'] = (producer, str(quantization.get('quant_algo', '')),
                                            quantization)
    if not declared:
        return QuantScheme(source='config.json')
    for source, (method, algo, _) in declared.items():
        if method != 'modelopt':
            raise QuantizationError(
                f'{model_dir}: {source} declares quantization {method or "(no quant_method)"!r}'
                f'{f" (quant_algo {algo!r})" if algo else ""}, which the torch backend does not '
                f'support; it loads {SUPPORTED}')
        if algo.upper() != 'FP8':
            raise QuantizationError(
                f'{model_dir}: {source} declares ModelOpt quant_algo {algo!r}; only per-tensor '
                "'FP8' is supported (not NVFP4, per-channel or per-block FP8)")
    algos = {algo.upper() for _, algo, _ in declared.values()}
    if len(algos) > 1:
        raise QuantizationError(f'{model_dir}: config.json and hf_quant_config.json disagree '
                                f'on the quantization: {sorted(algos)}')
    exclude: list[str] = []
    kv_algo = None
    for _, _, fields in declared.values():
        exclude += [str(m) for m in fields.get('exclude_modules') or () if str(m) not in exclude]
        kv_algo = kv_algo or fields.get('kv_cache_quant_algo')
    if kv_algo is not None and str(kv_algo).upper() != 'FP8':
        raise QuantizationError(f'{model_dir}: kv_cache_quant_algo {kv_algo!r} is not supported '
                                "(only none or 'FP8', whose scales are ignored)")
    return QuantScheme(method='modelopt-fp8', exclude_modules=tuple(exclude),
                       kv_cache_quant_algo=kv_algo, source=' and '.join(declared))


def fp8_matmul_supported(device: torch.device) -> bool:
    """True on CUDA devices with FP8 tensor cores (compute capability >= 8.9)."""
    if device.type != 'cuda' or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def check_scale(name: str, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """A per-tensor scale as a finite, positive fp32 scalar.

    :raises QuantizationError: missing, not a scalar (per-channel or per-block scales belong
        to other ModelOpt algorithms), or not finite and positive.
    """
    if scale is None:
        raise QuantizationError(f'{name} is missing: raw FP8 values are never used without '
                                'their scale')
    if scale.numel() != 1:
        raise QuantizationError(
            f'{name} has shape {tuple(scale.shape)}; quant_algo FP8 has one scale per tensor '
            '(per-channel and per-block FP8 are not supported)')
    value = scale.detach().float().reshape(())
    if not bool(torch.isfinite(value)) or float(value) <= 0.0:
        raise QuantizationError(f'{name} must be a finite positive number, got {float(value)}')
    return value


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale`` in ``dtype``, rounded once, without an fp32 copy of the matrix.

    FP8 e4m3 values convert to BF16, FP16 and FP32 exactly, and PyTorch multiplies by a
    Python-number scale in fp32 ("opmath") before rounding to ``dtype``, so this equals
    ``(weight.float() * scale).to(dtype)`` (the tests check it) at a third of the memory.
    """
    return weight.to(dtype).mul_(float(scale))


class FP8Linear(nn.Module):
    """A Linear whose weight stays float8_e4m3fn and runs as one scaled FP8 matmul.

    Activations are quantized with the checkpoint's static ``input_scale`` (saturating at
    +-448, as ModelOpt calibrated them), then ``torch._scaled_mm`` multiplies on FP8 tensor
    cores and rescales by ``input_scale * weight_scale`` into the activations' dtype.
    ``_scaled_mm`` needs both matrix sizes to be multiples of 16 (:meth:`fits`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE,
                                               device=device), requires_grad=False)
        self.register_buffer('weight_scale', torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer('input_scale', torch.ones((), dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
                     if bias else None)

    @staticmethod
    def fits(in_features: int, out_features: int) -> bool:
        return in_features % 16 == 0 and out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        quantized = (rows / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=self.input_scale,
                               scale_b=self.weight_scale, bias=self.bias, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'bias={self.bias is not None}, fp8=e4m3')
