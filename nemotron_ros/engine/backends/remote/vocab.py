"""A GGUF's tokenizer and chat template without its weights, for rendering prompts locally.

The remote backend renders and tokenizes every prompt itself, so the prompt format, the prefix
and the token counts admission control plans with are exactly the local backends'. It reads
the same GGUF as the llama.cpp backend with ``vocab_only`` (metadata and vocabulary, no
tensors: milliseconds, a few MB of memory), and reuses :class:`LlamaContext`'s tokenizer,
metadata and special-token code rather than repeating it.
"""

from __future__ import annotations

import contextlib
import ctypes

import llama_cpp
from llama_cpp import _logger as llama_logger

from ..llama.context import LlamaContext, LlamaLoadError, _check_gguf_header


class GgufVocabulary(LlamaContext):
    """The tokenizer part of a :class:`LlamaContext`: no weights, no context, no decoding.

    Only the text and metadata methods (``tokenize``, ``piece``, ``token_text``,
    ``metadata``, ``chat_template``, ``special_token_texts``, ``bos``, ``eos``,
    ``is_eog``) may be used; they read the model's vocabulary only.
    """

    def __init__(self, path: str) -> None:
        # The parent's constructor loads weights and a context; only its methods are wanted.
        _check_gguf_header(path)
        self.path = path
        self._stack = contextlib.ExitStack()
        llama_logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not model:
            raise LlamaLoadError(f'llama.cpp could not read the vocabulary of {path}')
        self.model = model
        self._stack.callback(llama_cpp.llama_model_free, model)
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._piece_buf = ctypes.create_string_buffer(256)
        # Every end-of-generation token (a server is told to ban them for ``ignore_eos``).
        self.eog_tokens = tuple(t for t in range(self.n_vocab) if self.is_eog(t))
