"""Text for calibration and evaluation, and fixed-length token chunks from it."""

from .genre import GENRES, genre_passages
from .text import BUILTIN_CORPORA, load_text, shakespeare_plays, strip_markdown
from .tokens import calibration_tokens, eval_tokens, tokenize

__all__ = [
    "BUILTIN_CORPORA",
    "GENRES",
    "calibration_tokens",
    "eval_tokens",
    "genre_passages",
    "load_text",
    "shakespeare_plays",
    "strip_markdown",
    "tokenize",
]
