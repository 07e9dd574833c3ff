"""Text sources, the Shakespeare split, token chunks, perplexity."""

import math

import pytest
import torch
from torch import nn

from factorkit.data import calibration_tokens, eval_tokens, load_text, shakespeare_plays, strip_markdown
from factorkit.errors import FactorkitError, NonFiniteLossError
from factorkit.eval import perplexity


def test_strip_markdown_keeps_the_words_and_drops_the_markup():
    md = "# Macbeth\n\n## ACT I\n\n_Thunder and lightning._\n\n**First Witch**  \nWhen shall we three meet again  \nIn thunder?\n"
    text = strip_markdown(md)
    assert text == "Macbeth\n\nACT I\n\nThunder and lightning.\n\nFirst Witch:\nWhen shall we three meet again\nIn thunder?\n"


def test_shakespeare_split_is_fixed_disjoint_and_complete():
    calib, held = shakespeare_plays("calib"), shakespeare_plays("eval")
    assert len(held) == 8 and len(calib) == len(shakespeare_plays("all")) - 8
    assert not set(calib) & set(held)
    assert held == shakespeare_plays("eval")  # reproducible
    assert held != shakespeare_plays("eval", seed=1)


def test_shakespeare_text_has_no_markdown():
    text = load_text("shakespeare", "eval")
    assert len(text) > 100_000 and "**" not in text and "\n#" not in text


def test_calibration_tokens_are_seeded_windows_of_the_text(tokenizer, text_file):
    a = calibration_tokens(tokenizer, text_file, n_samples=5, seq_len=16, seed=3)
    b = calibration_tokens(tokenizer, text_file, n_samples=5, seq_len=16, seed=3)
    c = calibration_tokens(tokenizer, text_file, n_samples=5, seq_len=16, seed=4)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    joined = ",".join(map(str, ids))
    assert all(",".join(map(str, row.tolist())) in joined for row in a)


def test_eval_tokens_are_consecutive_non_overlapping_chunks(tokenizer, text_file):
    ids = torch.tensor(tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"])
    chunks = eval_tokens(tokenizer, text_file, seq_len=20)
    assert chunks.shape == (ids.numel() // 20, 20)
    assert torch.equal(chunks.reshape(-1), ids[: chunks.numel()])
    assert eval_tokens(tokenizer, text_file, seq_len=20, max_chunks=3).shape == (3, 20)


def _bos_tokenizer():
    """A tokenizer that starts every text with <bos>, as Gemma's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import SAMPLE_TEXT

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<bos>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>"), bos


def test_a_bos_adding_tokenizer_starts_every_row_with_bos(text_file, tokenizer):
    from factorkit.data.tokens import bos_id

    tok, bos = _bos_tokenizer()
    assert bos_id(tok) == bos and bos_id(tokenizer) is None
    ids = torch.tensor(tok(text_file.read_text(), add_special_tokens=False)["input_ids"])
    assert bos not in ids.tolist()
    chunks = eval_tokens(tok, text_file, seq_len=20)
    assert chunks.shape == (ids.numel() // 19, 20) and (chunks[:, 0] == bos).all()
    assert torch.equal(chunks[:, 1:].reshape(-1), ids[: chunks.shape[0] * 19])  # nothing skipped, nothing repeated
    assert eval_tokens(tok, text_file, seq_len=20, max_chunks=2).shape == (2, 20)
    rows = calibration_tokens(tok, text_file, n_samples=6, seq_len=16, seed=1)
    assert rows.shape == (6, 16) and (rows[:, 0] == bos).all()
    joined = ",".join(map(str, ids.tolist()))
    assert all(",".join(map(str, row[1:].tolist())) in joined for row in rows)
    # ids given as a tensor are the caller's own: used as they are
    assert torch.equal(calibration_tokens(tok, ids, n_samples=2, seq_len=8, seed=0),
                       calibration_tokens(tokenizer, ids, n_samples=2, seq_len=8, seed=0))


def test_too_little_calibration_text_is_one_clear_error(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Fair is foul.")
    with pytest.raises(FactorkitError, match="fewer than one batch of 512"):
        calibration_tokens(tokenizer, short, n_samples=4, seq_len=512)


def test_missing_text_file_is_one_clear_error(tokenizer, tmp_path):
    with pytest.raises(FactorkitError, match="not found"):
        load_text(tmp_path / "nope.txt")


class Uniform(nn.Module):
    """A 'model' whose logits are constant: perplexity must equal the vocabulary size."""

    def __init__(self, vocab, value=0.0):
        super().__init__()
        self.vocab, self.value = vocab, value
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        logits = torch.full((*input_ids.shape, self.vocab), self.value) + self.w
        return type("Out", (), {"logits": logits})


def test_perplexity_of_uniform_model_is_vocabulary_size():
    chunks = torch.randint(0, 50, (3, 11))
    r = perplexity(Uniform(50), chunks, progress=False)
    assert math.isclose(r.perplexity, 50.0, rel_tol=1e-6)  # float32 logits
    assert r.tokens == 3 * 10 and r.chunks == 3 and r.dtype == "float32"


def test_non_finite_loss_is_an_error_not_skipped():
    with pytest.raises(NonFiniteLossError, match="NaN or infinite"):
        perplexity(Uniform(50, value=float("nan")), torch.randint(0, 50, (2, 8)), progress=False)


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_hub_corpora_offline_say_they_need_network(name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no cached copy
    with pytest.raises(FactorkitError, match="needs network access"):
        load_text(name, "eval")


def test_a_long_text_is_tokenized_once_per_tokenizer_and_read_back_identical(tokenizer, monkeypatch, tmp_path):
    import factorkit.data.tokens as tokens

    monkeypatch.setenv("FACTORKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(tokens, "CACHE_MIN_CHARS", 1000)
    text = load_text("shakespeare", "eval")[:20_000]
    first = tokens.tokenize(tokenizer, text)
    files = list((tmp_path / "tokens").glob("*.safetensors"))
    assert len(files) == 1 and first.dtype == torch.long

    calls = []
    real_call = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    again = tokens.tokenize(tokenizer, text)
    assert not calls and again.dtype == torch.long and torch.equal(again, first)  # read, not tokenized

    tokens.tokenize(tokenizer, text[:-1])  # another text: its own entry
    assert len(calls) == 1 and len(list((tmp_path / "tokens").glob("*.safetensors"))) == 2

    files[0].write_bytes(b"damaged")  # a damaged entry is tokenized again, the same, and rewritten
    assert torch.equal(tokens.tokenize(tokenizer, text), first) and len(calls) == 2
    assert torch.equal(tokens.tokenize(tokenizer, text), first) and len(calls) == 2

    tokens.tokenize(tokenizer, "short text")  # below the threshold: never cached
    assert len(list((tmp_path / "tokens").glob("*.safetensors"))) == 2
