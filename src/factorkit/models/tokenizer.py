"""Tokenizers for pretraining from scratch.

``bpe-N`` is a byte-level BPE of N tokens trained (Hugging Face ``tokenizers``)
on the training text itself, so a small model spends its parameters on the
blocks rather than on a 50k-row embedding. It is a function of the text and
N, cached by their hash, so every process of a distributed run and every
rerun gets the same one. Any other name is a model whose tokenizer is
used as is (``smollm2-135m``, a model folder, a hub id).
"""

from __future__ import annotations

import hashlib
import re

import transformers

from ..errors import FactorkitError
from .files import atomic_dir
from .hub import BUILTIN_MODELS, builtin_path, cache_dir

BPE = re.compile(r"^bpe-(\d+)$")
SPECIAL = "<|endoftext|>"


def load_tokenizer(name: str, text: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """``bpe-N`` trained on ``text``, or the tokenizer of the model ``name``."""
    match = BPE.match(name)
    if match:
        size = int(match[1])
        if not 256 < size <= 1 << 20:
            raise FactorkitError(f"{name}: a byte-level BPE needs more than 256 tokens; use e.g. bpe-4096.")
        if not text:
            raise FactorkitError(f"{name} is trained on the training text, and the text is empty; give more text.")
        return _bpe(text, size)
    try:
        path = builtin_path(name) if name in BUILTIN_MODELS else name
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        raise FactorkitError(f"no tokenizer {name!r}: use bpe-N (trained on the text, e.g. bpe-4096), a built-in "
                             f"model ({', '.join(BUILTIN_MODELS)}), a model folder or a hub id (online).") from None


def _bpe(text: str, size: int) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    folder = cache_dir() / "tokenizers" / f"bpe-{size}-{digest}"
    if not (folder / "tokenizer.json").is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[SPECIAL], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(text.split("\n\n"), trainer)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL, bos_token=SPECIAL)
        try:
            with atomic_dir(folder, overwrite=True) as tmp:
                fast.save_pretrained(tmp)
        except OSError:  # another process of a distributed run wrote the same folder first
            if not (folder / "tokenizer.json").is_file():
                raise
    return transformers.PreTrainedTokenizerFast.from_pretrained(folder)
