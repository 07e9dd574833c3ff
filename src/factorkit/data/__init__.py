"""Text for calibration and evaluation, and fixed-length token chunks from it."""

from .text import BUILTIN_CORPORA, load_text, shakespeare_plays, strip_markdown
from .tokens import calibration_tokens, eval_tokens, tokenize

__all__ = [
    "BUILTIN_CORPORA",
    "calibration_tokens",
    "eval_tokens",
    "load_text",
    "shakespeare_plays",
    "strip_markdown",
    "tokenize",
]
