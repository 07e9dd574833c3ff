"""Token chunks of fixed length: random windows for calibration, consecutive
non-overlapping chunks for evaluation."""

from __future__ import annotations

import logging
import os

import torch

from ..errors import FactorkitError
from .text import load_text

log = logging.getLogger(__name__)

CACHE_MIN_CHARS = 1 << 20  # token ids of texts this long are kept in the cache, per tokenizer


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D LongTensor (no special tokens).

    A long text (the built-in corpora's splits) is tokenized once per tokenizer: its ids are kept under
    ``cache_dir()/tokens`` (safetensors, named by the tokenizer's and the text's sha256) and read from there
    afterwards. Tokenizing it again would cost seconds and, briefly, the tokenizer's working memory for the
    whole text, more than the rest of an offloaded compression holds."""
    key = _cache_key(tokenizer, text) if len(text) >= CACHE_MIN_CHARS else None
    cached = _read_ids(key) if key else None
    if cached is not None:
        return cached
    # A long text in one call is fine for fast tokenizers; silence the length warning.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    if key:
        from ..eval.memory import release_memory

        release_memory(collect=False)  # what the encoding held goes back to the system now, not at exit
        _write_ids(key, ids)
    return ids


def _cache_key(tokenizer, text: str) -> str | None:
    """sha256 of everything that decides the ids: the tokenizer's class, its whole definition (fast
    tokenizers; a slow one is not cached) and the text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import hashlib

    import transformers

    h = hashlib.sha256(f"{type(tokenizer).__name__}\0{transformers.__version__}\0".encode())
    h.update(backend.to_str().encode())
    h.update(b"\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _ids_file(key: str):
    from ..models.hub import cache_dir

    return cache_dir() / "tokens" / f"{key}.safetensors"


def _read_ids(key: str) -> torch.Tensor | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = _ids_file(key)
    try:
        ids = load_file(str(file))["ids"]
    except (OSError, KeyError, SafetensorError):  # not there yet, or damaged: tokenize again (and rewrite)
        return None
    return ids.long() if ids.ndim == 1 else None


def _write_ids(key: str, ids: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from ..models.files import atomic_file

    small = torch.int32 if ids.numel() == 0 or int(ids.max()) < 2**31 else torch.long
    try:
        with atomic_file(_ids_file(key)) as tmp:
            save_file({"ids": ids.to(small).contiguous()}, str(tmp))
    except OSError as err:  # a read-only cache only costs the tokenizing next time
        log.info("token ids not cached (%s); the text is tokenized again next time.", err)


def bos_id(tokenizer) -> int | None:
    """The id the tokenizer puts at the start of every text (Gemma's ``<bos>``),
    or None when it adds none (SmolLM2). Models trained with such a token read
    text without it as out of distribution: Gemma-3-270M's perplexity on the
    held-out plays is ~2.3x higher without it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # a tokenizer without special-token handling adds nothing
        return None
    return bos if with_special and with_special[0] == bos else None


def _with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows], dim=1)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _source_ids(tokenizer, source: str | os.PathLike | torch.Tensor, split: str, seed: int) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source.reshape(-1).long()
    return tokenize(tokenizer, load_text(source, split, seed))


def calibration_tokens(tokenizer, source: str | os.PathLike | torch.Tensor, n_samples: int = 32,
                       seq_len: int = 512, seed: int = 0, split: str = "calib") -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets: (n_samples, seq_len).

    When the tokenizer starts every text with a BOS token, each row is that
    token followed by ``seq_len - 1`` tokens of text, as the model saw text in
    training. Token ids given as a tensor are used as they are."""
    if not (_whole(n_samples) and _whole(seq_len)) or n_samples < 1 or seq_len < 2:
        raise FactorkitError(f"need at least 1 sample of at least 2 tokens (whole numbers), got {n_samples!r} x "
                             f"{seq_len!r}.")
    ids = _source_ids(tokenizer, source, split, seed)
    bos = None if isinstance(source, torch.Tensor) else bos_id(tokenizer)
    width = seq_len - (bos is not None)
    if ids.numel() < width:
        raise FactorkitError(
            f"the calibration text has {ids.numel()} tokens, fewer than one batch of {seq_len}; "
            "give more text or a smaller --calib-seq-len."
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - width + 1, (n_samples,), generator=g)
    return _with_bos(torch.stack([ids[s : s + width] for s in starts.tolist()]), bos)


def eval_tokens(tokenizer, source: str | os.PathLike | torch.Tensor, seq_len: int = 2048,
                max_chunks: int | None = None, seed: int = 0, split: str = "eval") -> torch.Tensor:
    """Consecutive non-overlapping chunks from the start of the text: (chunks, seq_len).
    The tail shorter than ``seq_len`` is dropped. With a BOS-adding tokenizer
    each chunk is BOS + ``seq_len - 1`` text tokens (BOS is never scored)."""
    if not _whole(seq_len) or seq_len < 2:
        raise FactorkitError(f"seq_len must be at least 2 tokens, got {seq_len!r}.")
    if max_chunks is not None and (not _whole(max_chunks) or max_chunks < 1):
        raise FactorkitError(f"max_chunks must be a whole number of at least 1 (or None for all), got {max_chunks!r}.")
    ids = _source_ids(tokenizer, source, split, seed)
    bos = None if isinstance(source, torch.Tensor) else bos_id(tokenizer)
    width = seq_len - (bos is not None)
    if max_chunks is not None:
        ids = ids[: max_chunks * width]
    return _with_bos(chunk_rows(ids, width, "evaluation text"), bos)


def chunk_rows(ids: torch.Tensor, seq_len: int, what: str = "text") -> torch.Tensor:
    """Consecutive non-overlapping rows of ``seq_len`` tokens (the tail is dropped)."""
    n = ids.numel() // seq_len
    if n < 1:
        raise FactorkitError(f"the {what} has {ids.numel()} tokens, fewer than one sequence of {seq_len}; "
                             "give more text or a smaller --seq-len.")
    return ids[: n * seq_len].view(n, seq_len)


def pretrain_rows(tokenizer, train_text: str, heldout_text: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out rows of ``seq_len`` tokens, (N, seq_len) each."""
    return (chunk_rows(tokenize(tokenizer, train_text), seq_len, "training text"),
            chunk_rows(tokenize(tokenizer, heldout_text), seq_len, "held-out text"))
