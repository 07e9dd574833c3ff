"""Tiny randomly initialised models and a tokenizer trained in-process, for the logic tests."""

from __future__ import annotations

import socket

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SAMPLE_TEXT = (
    "When shall we three meet again\nIn thunder, lightning, or in rain?\n"
    "When the hurlyburly's done,\nWhen the battle's lost and won.\n"
    "That will be ere the set of sun.\nWhere the place?\nUpon the heath.\n"
    "Fair is foul, and foul is fair:\nHover through the fog and filthy air.\n"
) * 40


def tiny_llama(seed: int = 0, vocab: int = 256, layers: int = 2, hidden: int = 32) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, vocab: int = 256) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return transformers.GPT2LMHeadModel(config).eval()


def _tiny_gqa(config_cls, model_cls, seed: int, vocab: int, **extra):
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    return model_cls(config).eval()


def tiny_qwen2(seed: int = 0, vocab: int = 256) -> transformers.Qwen2ForCausalLM:
    """Qwen2 has biases on q, k and v: exercises bias handling."""
    return _tiny_gqa(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, seed, vocab)


def tiny_mistral(seed: int = 0, vocab: int = 256) -> transformers.MistralForCausalLM:
    return _tiny_gqa(transformers.MistralConfig, transformers.MistralForCausalLM, seed, vocab, sliding_window=16)


def interrupting(fn, calls: list, stop_at: int | None):
    """``fn`` that counts its calls in ``calls`` and raises KeyboardInterrupt at call number ``stop_at`` (an
    interrupted run; None: never)."""
    def run(*args, **kwargs):
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        calls.append(1)
        return fn(*args, **kwargs)
    return run


def free_port() -> int:
    """A TCP port free on this machine now (for a process group of the test's own processes)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_train(cls, **settings):
    """``cls`` (PretrainConfig, FinetuneConfig) from flat settings: those of the training loop go into
    its nested TrainConfig, on top of the owner's own training defaults."""
    import dataclasses

    from factorkit.training import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {k: settings.pop(k) for k in list(settings) if k in names}
    return cls(**settings, train=dataclasses.replace(cls().train, **train))


@pytest.fixture
def qwen2():
    return tiny_qwen2()


@pytest.fixture
def mistral():
    return tiny_mistral()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="session")
def tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture
def calib(tokenizer):
    from factorkit.data import calibration_tokens

    return calibration_tokens(tokenizer, torch.tensor(tokenizer(SAMPLE_TEXT)["input_ids"]), n_samples=8, seq_len=32)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "plays.txt"
    path.write_text(SAMPLE_TEXT)
    return path


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A plain Hugging Face folder (config, safetensors, tokenizer) of a tiny LLaMA."""
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
