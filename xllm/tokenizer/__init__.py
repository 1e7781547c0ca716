"""xllm's tokenizers: exact SentencePiece-BPE and byte-level BPE in plain Python.

Two families of BPE cover the Llama-architecture models:

* `SentencePieceBPE` (`sentencepiece.py`): Llama 2, Mistral, TinyLlama. Spaces
  become "▁", a "▁" is put before the text, merges are chosen by piece score,
  characters outside the vocabulary fall back to `<0x..>` byte tokens.
* `ByteLevelBPE` (`byte_level.py`): GPT-2, Llama 3, Qwen 2, SmolLM2. A regex
  cuts the text into words (`pretokenize.py`), bytes are spelled as printable
  characters, merges are applied by rank.

Both share `base.Tokenizer` (special tokens, decoding) and `bpe.bpe_merge`
(the merge loop). Where a tokenizer comes from:

    >>> from xllm.tokenizer import load_tokenizer
    >>> tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")    # doctest: +SKIP
    >>> tok.encode("<|im_start|>user\\nHi<|im_end|>", allow_special=True)  # doctest: +SKIP
    [1, 4093, 198, 26843, 2]
    >>> tok.decode([4093, 198, 26843])                              # doctest: +SKIP
    'user\\nHi'

`load_tokenizer` accepts a .gguf file, a Hugging Face directory (with
tokenizer.json or tokenizer.model), a tokenizer.json, a SentencePiece
tokenizer.model, a llama2.c tokenizer.bin, or the file that
`convert/export_tokenizer.py` writes. Any problem raises
`xllm.errors.ModelFormatError` naming the file.
"""

from .base import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer
from .gguf_loader import tokenizer_from_gguf_metadata
from .load import load_tokenizer, tokenizer_from_dict
from .stream import StreamDecoder

__all__ = [
    "load_tokenizer", "tokenizer_from_gguf_metadata", "tokenizer_from_dict",
    "Tokenizer", "StreamDecoder",
    "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE",
]
