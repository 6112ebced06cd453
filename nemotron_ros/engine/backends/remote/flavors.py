"""What differs between OpenAI-compatible servers: their name, the grammar field, sampling fields.

The node renders the prompt and builds the grammar itself; each server takes that grammar in
its own request field (checked against each server's source or documentation):

* ``llama_cpp`` (llama.cpp's ``llama-server`` and llama-cpp-python's ``llama_cpp.server``):
  top-level ``grammar`` (GBNF). The Python server takes a text prompt only, so the rendered
  text goes as is; it reports ``owned_by: "me"``, ``llama-server`` ``"llamacpp"``.
* ``vllm``: ``structured_outputs: {"grammar": ...}`` (``guided_grammar`` was removed in vLLM
  0.12, docs.vllm.ai "Structured Outputs"); ``owned_by: "vllm"``.
* ``sglang``: top-level ``ebnf`` of ``CompletionRequest``
  (``sglang/srt/entrypoints/openai/protocol.py``); ``owned_by: "sglang"``.
* ``trtllm`` (``trtllm-serve``): ``response_format: {"type": "ebnf", "ebnf": ...}``
  (``tensorrt_llm/serve/openai_protocol.py``; the server needs ``guided_decoding_backend:
  xgrammar`` in its ``--config`` YAML); ``owned_by: "tensorrt_llm"``. Its requests forbid
  unknown fields, so each flavor sends only the fields its server declares.

vLLM, SGLang and TensorRT-LLM take the prompt as token ids, so what the server evaluates is
exactly the node's tokenization (no second BOS, no re-tokenized markers), and special tokens
are kept in the streamed text (``skip_special_tokens: false``) so the node parses the same
text a local backend would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from ...types import SamplingParams

FLAVORS = ('vllm', 'sglang', 'trtllm', 'llama_cpp')

#: ``owned_by`` of ``GET /v1/models`` -> flavor (what ``remote.flavor: auto`` reads).
OWNED_BY = {'vllm': 'vllm', 'sglang': 'sglang', 'tensorrt_llm': 'trtllm',
            'llamacpp': 'llama_cpp', 'me': 'llama_cpp'}

#: Where each flavor takes the grammar, for messages and the README.
GRAMMAR_FIELD = {'llama_cpp': 'grammar', 'vllm': 'structured_outputs.grammar',
                 'sglang': 'ebnf', 'trtllm': 'response_format {type: ebnf}'}

# A logit bias that no sampler lets through (llama_cpp has no ignore_eos field).
_BANNED = -1.0e9


def detect(owned_by: object) -> Optional[str]:
    """The flavor a server's ``owned_by`` names, or None for an unknown server."""
    return OWNED_BY.get(owned_by) if isinstance(owned_by, str) else None


def completion_body(flavor: str, model: str, text: str, tokens: Sequence[int],
                    sampling: SamplingParams, max_tokens: int, grammar: Optional[str],
                    eog_tokens: Sequence[int] = ()) -> dict[str, Any]:
    """The JSON body of one streamed ``POST /v1/completions`` for ``flavor``.

    :param text: the rendered prompt (sent to llama_cpp servers).
    :param tokens: the same prompt as token ids (sent to the others).
    :param grammar: GBNF of the allowed answers, or None for unconstrained.
    :param eog_tokens: end-of-generation ids, banned by logit bias on llama_cpp servers when
        ``sampling.ignore_eos`` (the others take ``ignore_eos``).
    """
    body: dict[str, Any] = {
        'model': model, 'max_tokens': max_tokens, 'temperature': sampling.temperature,
        'top_p': sampling.top_p, 'min_p': sampling.min_p, 'seed': sampling.seed,
        'stream': True}
    if flavor == 'llama_cpp':
        body.update(prompt=text, top_k=sampling.top_k, repeat_penalty=sampling.repeat_penalty)
        if grammar is not None:
            body['grammar'] = grammar
        if sampling.ignore_eos and grammar is None:
            body['logit_bias'] = {str(t): _BANNED for t in eog_tokens}
        return body
    body.update(prompt=list(tokens), repetition_penalty=sampling.repeat_penalty,
                ignore_eos=sampling.ignore_eos and grammar is None,
                skip_special_tokens=False, stream_options={'include_usage': True},
                # 0 switches top-k off here; vLLM and SGLang spell that -1.
                top_k=sampling.top_k if sampling.top_k > 0 or flavor == 'trtllm' else -1)
    if grammar is not None:
        if flavor == 'vllm':
            body['structured_outputs'] = {'grammar': grammar}
        elif flavor == 'sglang':
            body['ebnf'] = grammar
        else:
            body['response_format'] = {'type': 'ebnf', 'ebnf': grammar}
    return body
