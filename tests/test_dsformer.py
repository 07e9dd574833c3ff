"""DSFormer: straight-through masks, budget, data-aware start, export, resumable training."""

import math

import pytest
import torch

import factorkit as fk
from factorkit.factors import DenseSparseLinear, DictionaryLinear, factor_modules
from factorkit.solvers.sparsity import (
    Pattern,
    dense_sparse_budget,
    dense_sparse_cost,
    magnitude_mask,
    straight_through,
    whitened_dense_sparse,
)
from factorkit.training import TrainConfig, model_loss, train

from conftest import tiny_llama


@pytest.mark.parametrize("pattern", ["topk", "2:4", "1:4"])
def test_straight_through_mask_keeps_s_per_row_and_passes_every_gradient(pattern):
    gen = torch.Generator().manual_seed(0)
    p = Pattern.parse(pattern)
    k = 16
    s = p.sparsity(k, 4.0)
    coef = torch.randn(10, k, generator=gen, requires_grad=True)
    mask = magnitude_mask(coef, s, p)
    assert (mask.sum(1) == s).all()
    if p.structured:  # n of every m consecutive entries
        assert (mask.view(10, k // p.m, p.m).sum(-1) == p.n).all()
    mag = coef.detach().abs()
    if not p.structured:  # the s largest magnitudes of each row
        assert (mag.masked_fill(~mask, float("inf")).amin(1) >= mag.masked_fill(mask, -1.0).amax(1)).all()
    masked = straight_through(coef, mask)
    assert torch.equal(masked.detach(), coef.detach() * mask)  # forward: masked
    upstream = torch.randn(10, k, generator=gen)
    (masked * upstream).sum().backward()
    assert torch.equal(coef.grad, upstream)  # backward: identity, masked entries included


def test_budget_arithmetic():
    k, s = dense_sparse_budget(576, 1536, 0.3)  # params: k = floor(0.7 * 576 * 1536 / (576 + 1536 / 2))
    assert k == math.floor(0.7 * 576 * 1536 / (576 + 768)) and s == k // 2
    assert dense_sparse_cost(576, 1536, k, s)[0] <= 0.7 * 576 * 1536 < dense_sparse_cost(576, 1536, k + 2, s + 1)[0]
    k4, s4 = dense_sparse_budget(576, 1536, 0.3, pattern=Pattern(2, 4))
    assert k4 % 16 == 0 and s4 == k4 // 2  # 2:4 over k, k a multiple of 16 for GPU kernels
    kb, sb = dense_sparse_budget(576, 1536, 0.3, blocks=4)  # four bases cost more: fewer atoms each
    assert kb < k and dense_sparse_cost(576, 1536, kb, sb, blocks=4)[0] <= 0.7 * 576 * 1536
    ks, ss = dense_sparse_budget(576, 1536, 0.3, count="storage", value_bits=16)
    assert dense_sparse_cost(576, 1536, ks, ss)[1] <= 0.7 * 576 * 1536 * 16 < dense_sparse_cost(576, 1536, k, s)[1]
    with pytest.raises(ValueError, match="divide"):
        dense_sparse_budget(576, 1536, 0.3, blocks=5)


@pytest.mark.parametrize("pattern", ["topk", "2:4"])
def test_data_aware_start_beats_the_cut_and_the_random_start(pattern):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(48, 32, generator=gen, dtype=torch.float64)
    X = torch.randn(400, 32, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 32, dtype=torch.float64)
    G = X.T @ X
    p = Pattern.parse(pattern)
    k = 16
    s = p.sparsity(k, 2.0)

    def err(C, B):
        return float((X @ (W - C @ B).T).norm() / (X @ W.T).norm())

    cut = whitened_dense_sparse(W, k, s, p, G, rounds=0)
    fitted = whitened_dense_sparse(W, k, s, p, G, rounds=3)
    assert (fitted[0] != 0).sum(1).max() <= s
    assert err(*fitted) <= err(*cut) + 1e-12  # each least-squares round can only lower the whitened error
    assert err(*fitted) < 0.9  # far better than nothing; a random start has error ~1 or more
    unwhitened = whitened_dense_sparse(W, k, s, p, None, rounds=3)
    assert err(*fitted) < err(*unwhitened)  # the data-aware start fits the data better


@pytest.mark.parametrize("blocks,pattern", [(1, "topk"), (3, "2:4")])
def test_export_preserves_the_forward_output(blocks, pattern):
    gen = torch.Generator().manual_seed(2)
    p = Pattern.parse(pattern)
    k, out, n = 8, 12, 10
    s = p.sparsity(k, 2.0)
    layer = DenseSparseLinear.from_factors(torch.randn(out, k, generator=gen), torch.randn(blocks * k, n, generator=gen),
                                           s, torch.randn(out, generator=gen), blocks=blocks, pattern=pattern)
    x = torch.randn(5, n, generator=gen)
    compact = layer.export()
    assert isinstance(compact, DictionaryLinear) and compact.blocks == blocks
    assert torch.allclose(compact(x), layer(x), atol=1e-5)
    assert torch.allclose(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-5)
    assert compact.param_count() == layer.param_count() == blocks * k * n + out * s + out
    assert compact.index_bits() == out * k


def test_resume_after_an_interruption_ends_where_the_uninterrupted_run_ends(tmp_path):
    data = torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(3))

    def run(checkpoint_dir, stop_after=None, model=None):
        model = model or _factored_tiny()
        config = TrainConfig(steps=6, lr=1e-2, batch_size=2, grad_accum=2, checkpoint_dir=checkpoint_dir,
                             checkpoint_every=2, seed=7)
        params = [(n, p) for n, p in model.named_parameters() if ".mlp." in n or ".self_attn." in n]
        return model, train(model, data, params, config, model_loss, progress=False, stop_after=stop_after)

    straight, full = run(None)
    interrupted, first = run(str(tmp_path / "ck"), stop_after=3)  # the last checkpoint is step 3
    assert len(first.losses) == 3
    resumed, second = run(str(tmp_path / "ck"))  # a fresh process would start from the saved step
    assert second.resumed_from == 3 and second.losses == full.losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _factored_tiny():
    model = tiny_llama(layers=2, hidden=32)
    gen = torch.Generator().manual_seed(4)
    for i, block in enumerate(model.model.layers):
        for name in ("self_attn.q_proj", "mlp.up_proj"):
            lin = block.get_submodule(name)
            k = 8
            module = DenseSparseLinear.from_factors(torch.randn(lin.out_features, k, generator=gen) * 0.1,
                                                    torch.randn(k, lin.in_features, generator=gen), 4)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, module)
    return model


def test_frozen_masks_do_not_move_and_learned_ones_do(calib):
    moved = {}
    for stf in (True, False):
        model = tiny_llama(layers=2, hidden=32)
        report = fk.compress(model, fk.DSFormerConfig(ratio=0.3, stf=stf, train=TrainConfig(steps=15, lr=3e-2),
                                                      init="random"), calib, progress=False)
        moved[stf] = report.fit["support_moved"]
        assert all(isinstance(m, DictionaryLinear) for _, m in factor_modules(model))
    assert moved[False] == 0.0 and moved[True] > 0.0


def test_dsformer_trains_saves_and_reloads_identically(calib, tmp_path):
    model = tiny_llama(layers=2, hidden=64)  # 2:4 rounds k to a multiple of 16: wide enough to keep some
    ids = calib[:2]
    with torch.no_grad():
        dense_loss = float(model(input_ids=ids, labels=ids).loss)
    report = fk.compress(model, fk.DSFormerConfig(ratio=0.3, pattern="2:4", train=TrainConfig(steps=30, lr=1e-2,
                                                                                               distill=0.5)),
                         calib, progress=False)
    losses = report.fit["losses"]
    assert losses[-1] < losses[0]
    summary = fk.summarize(model)
    assert summary.ratio_targeted >= 0.3 and summary.factor_modules == 14
    fk.save(model, tmp_path / "m")
    again = fk.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
        assert float(model(input_ids=ids, labels=ids).loss) < dense_loss + 1.0


@pytest.mark.parametrize("options,message", [
    ({"pattern": "3:2"}, "n:m"),
    ({"init": "kmeans"}, "init must be one of svd, cospadi, random, got 'kmeans'"),
    ({"blocks": 5}, "does not divide"),
    ({"train": {"steps": 0}}, "steps must be"),
])
def test_bad_dsformer_settings_raise_one_clear_error(calib, options, message):
    with pytest.raises(fk.FactorkitError, match=message):
        fk.compress(tiny_llama(), fk.DSFormerConfig.from_dict({"ratio": 0.3, **options}), calib, progress=False)


def test_dsformer_from_the_command_line_resumes_from_its_checkpoint(capsys, model_dir, tmp_path):
    from factorkit.cli import main

    args = ["-q", "compress", "--model", str(model_dir), "--method", "dsformer", "--ratio", "0.3",
            "--pattern", "topk", "--blocks", "2", "--train-steps", "4", "--train-lr", "1e-2", "--calib-samples", "4", "--calib-seq-len",
            "32", "--train-checkpoint-dir", str(tmp_path / "ck")]
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert (tmp_path / "ck" / "train_state.json").exists()
    # the state of the finished run is there: a rerun trains nothing and writes the same model
    assert main(args + ["--out", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    a, b = fk.load(tmp_path / "a"), fk.load(tmp_path / "b")
    assert fk.compression_record(a)["config"]["blocks"] == 2
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "svdllm", "--train-steps", "5",
                 "--out", str(tmp_path / "bad")])
    assert code == 2 and "--train-steps applies to --method dsformer only" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _tiny_bert_classifier(seed=0, labels=3):
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=labels)
    return transformers.BertForSequenceClassification(config).eval()


def test_dsformer_trains_an_encoder_with_a_task_head_on_labelled_batches(tmp_path):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 256, (48, 16), generator=gen)
    labels = (ids[:, 1] % 3)  # learnable from the tokens
    batches = [{"input_ids": ids[i : i + 8], "labels": labels[i : i + 8]} for i in range(0, 48, 8)]
    model = _tiny_bert_classifier()
    report = fk.compress(model, fk.DSFormerConfig(ratio=0.3, train=TrainConfig(steps=40, lr=3e-3, batch_size=8,
                                                                                distill=0.5)),
                         batches, progress=False)
    losses = report.fit["losses"]
    assert sum(losses[-5:]) < sum(losses[:5])  # the task loss (cross-entropy of the head) went down
    assert fk.summarize(model).factor_modules == 12  # q, k, v, attention out, intermediate, output per layer
    fk.save(model, tmp_path / "bert")
    again = fk.load(tmp_path / "bert")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids[:4]).logits, model(input_ids=ids[:4]).logits)
    # one budget over the encoder: the Fisher pass on the task head's loss, within the budget, reloads
    model = _tiny_bert_classifier()
    fit = fk.compress(model, fk.DSFormerConfig(ratio=0.3, allocation="global", train=TrainConfig(steps=2, lr=3e-3,
                                                                                                   batch_size=8)),
                      batches, progress=False).fit
    assert fit["bytes"] <= fit["budget_bytes"] and len(fit["choice"]) == 12
    fk.save(model, tmp_path / "bert-global")
    with torch.no_grad():
        assert torch.equal(fk.load(tmp_path / "bert-global")(input_ids=ids[:4]).logits,
                           model(input_ids=ids[:4]).logits)
    with pytest.raises(fk.FactorkitError, match="one length"):
        uneven = [{"input_ids": ids[:4], "labels": labels[:4]}, {"input_ids": ids[4:8, :10], "labels": labels[4:8]}]
        fk.compress(_tiny_bert_classifier(), fk.DSFormerConfig(ratio=0.3, train=TrainConfig(steps=1)), uneven, progress=False)


def test_genre_passages_are_exact_length_balanced_and_split_by_position(tokenizer):
    from factorkit.data import GENRES, genre_passages

    train_set = genre_passages(tokenizer, "train", seq_len=24, per_class=40, seed=0)
    test_set = genre_passages(tokenizer, "test", seq_len=24, per_class=40, seed=0)
    assert train_set["input_ids"].shape == (3 * 40, 24) and train_set["input_ids"].dtype == torch.long
    assert torch.bincount(train_set["labels"], minlength=len(GENRES)).tolist() == [40, 40, 40]
    seen = {tuple(r) for r in train_set["input_ids"].tolist()}
    assert not any(tuple(r) in seen for r in test_set["input_ids"].tolist())  # no passage in both splits
    again = genre_passages(tokenizer, "train", seq_len=24, per_class=40, seed=0)
    assert torch.equal(again["input_ids"], train_set["input_ids"])  # seeded
