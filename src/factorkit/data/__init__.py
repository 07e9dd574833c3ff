"""Text for calibration and evaluation, and fixed-length token chunks from it."""

from .genre import GENRES, genre_passages
from .text import BUILTIN_CORPORA, load_text, shakespeare_plays, strip_markdown, train_heldout_text
from .tokens import calibration_tokens, chunk_rows, eval_tokens, pretrain_rows, tokenize

__all__ = [
    "BUILTIN_CORPORA",
    "GENRES",
    "calibration_tokens",
    "chunk_rows",
    "eval_tokens",
    "genre_passages",
    "load_text",
    "pretrain_rows",
    "shakespeare_plays",
    "strip_markdown",
    "tokenize",
    "train_heldout_text",
]
