"""Healing: distillation of the compressed model from the dense one, only the factors trained, resumable."""

import copy
import dataclasses

import pytest
import torch

import factorkit as fk
from factorkit.cli import main
from factorkit.factors import DictionaryLinear, LowRankLinear, factor_modules, factor_parameters
from factorkit.methods.heal import heal
from factorkit.surgery import model_targets
from factorkit.training import TrainConfig, model_loss, train

from conftest import tiny_llama

FAST = TrainConfig(lr=3e-3, batch_size=4, warmup=2, distill=1.0)


def distill_loss(model, teacher, data) -> float:
    """T^2 KL(teacher || model) at T = 2, the distillation term alone."""
    with torch.no_grad():
        return float(model_loss(model, data, teacher, 1.0, 2.0) - model_loss(model, data))


def trained_llama(data, seed=3):
    """A tiny model trained on ``data`` first, so that it has something to teach (a random one
    predicts nearly uniformly, and any compression of it changes next to nothing)."""
    model = tiny_llama(seed=seed)
    train(model, data, list(model.named_parameters()), TrainConfig(steps=60, lr=1e-2, warmup=5, batch_size=8),
          progress=False)
    return model.eval()


@pytest.mark.parametrize("config", [fk.SVDLLMConfig(ratio=0.6, heal=40, heal_train=FAST),
                                    fk.SVDConfig(ratio=0.6, heal=40, heal_train=FAST),
                                    fk.CoSpaDiConfig(ratio=0.5, iterations=2, heal=40, heal_train=FAST)],
                         ids=["svdllm", "svd", "cospadi"])
def test_healing_lowers_the_distillation_loss_and_trains_only_the_factors(config, calib):
    dense = trained_llama(calib)
    unhealed = copy.deepcopy(dense)
    fk.compress(unhealed, dataclasses.replace(config, heal=0), calib, progress=False)
    healed = copy.deepcopy(dense)
    report = fk.compress(healed, config, calib, progress=False)
    before, after = distill_loss(unhealed, dense, calib), distill_loss(healed, dense, calib)
    assert after < 0.5 * before, (before, after)
    objective = [float(model_loss(m, calib, dense, 1.0, 2.0).detach()) for m in (unhealed, healed)]
    assert objective[1] < objective[0]
    assert len(report.fit["heal"]["losses"]) == 40
    factor_names = {n for n, _ in factor_parameters(healed)}
    changed = {n for n, p in healed.named_parameters() if not torch.equal(p, unhealed.get_parameter(n))}
    assert changed and changed <= factor_names  # embeddings, norms, anything kept dense: untouched
    for (name, a), (_, b) in zip(factor_modules(healed), factor_modules(unhealed)):
        if isinstance(a, DictionaryLinear):
            assert torch.equal(a.indices, b.indices)  # the supports of the codes stay where they were
        assert type(a) is type(b)


def test_healing_the_compressed_model_afterwards_equals_compressing_with_heal(calib):
    """heal() on a model the method compressed without healing gives the weights compress(heal=N) gives: the
    benchmarks heal a copy of the point they just measured instead of compressing again."""
    dense = trained_llama(calib, seed=5)
    config = fk.SVDLLMConfig(ratio=0.6, heal=10, heal_train=FAST)
    at_once = copy.deepcopy(dense)
    fk.compress(at_once, config, calib, progress=False)
    after = copy.deepcopy(dense)
    fk.compress(after, dataclasses.replace(config, heal=0), calib, progress=False)
    heal(after, copy.deepcopy(dense), calib, config, progress=False)
    pairs = list(zip(factor_parameters(after), factor_parameters(at_once)))
    assert pairs
    for (n, a), (_, b) in pairs:
        assert torch.equal(a, b), n


def test_healing_resumes_to_the_same_weights_after_an_interruption(calib, tmp_path):
    dense = tiny_llama(seed=4)
    compressed = copy.deepcopy(dense)
    fk.compress(compressed, fk.SVDLLMConfig(ratio=0.5), calib, progress=False)
    config = fk.SVDLLMConfig(ratio=0.5, heal=12,
                             heal_train=TrainConfig(lr=2e-3, batch_size=4, warmup=2, checkpoint_dir=str(tmp_path),
                                                    checkpoint_every=5))
    whole = copy.deepcopy(compressed)
    heal(whole, dense, calib, dataclasses.replace(config, heal_train=dataclasses.replace(config.heal_train,
                                                                                          checkpoint_dir=None)),
         progress=False)
    first = copy.deepcopy(compressed)
    heal(first, dense, calib, config, progress=False, stop_after=7)  # interrupted after step 7 (saved at 5 and 7)
    resumed = copy.deepcopy(compressed)
    out = heal(resumed, dense, calib, config, progress=False)
    assert out["resumed_from"] == 7 and len(out["losses"]) == 12
    for (n, a), (_, b) in zip(factor_parameters(resumed), factor_parameters(whole)):
        assert torch.equal(a, b), n
    other = dataclasses.replace(config, heal_train=dataclasses.replace(config.heal_train, lr=1e-3))
    with pytest.raises(fk.FactorkitError, match="training state of another run"):
        heal(copy.deepcopy(compressed), dense, calib, other, progress=False)


def test_a_healed_model_saves_and_reloads_to_identical_logits(calib, tmp_path):
    model = tiny_llama(seed=5)
    config = fk.SVDLLMConfig(ratio=0.5, heal=5, heal_train=FAST)
    report = fk.compress(model, config, calib, progress=False)
    fk.save(model, tmp_path / "m")
    back = fk.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(calib[:2]).logits, back(calib[:2]).logits)
    assert fk.CompressionConfig.from_dict(report.record()["config"]) == config
    assert any(isinstance(m, LowRankLinear) for _, m in factor_modules(back))


def test_healing_a_data_free_method_needs_data_and_a_dense_model_has_nothing_to_heal(calib):
    with pytest.raises(fk.FactorkitError, match="heals on text"):
        fk.compress(tiny_llama(), fk.SVDConfig(ratio=0.3, heal=3), None, progress=False)
    # ratio so small that global allocation keeps every matrix dense: nothing to train
    model = tiny_llama()
    with pytest.raises(fk.FactorkitError, match="nothing to heal"):
        fk.compress(model, fk.SVDLLMConfig(ratio=0.3, heal=3, ranks={n: 10_000 for n in
                                                                      model_targets(model, None)}),
                    calib, progress=False)


def test_healing_trains_on_its_own_text_when_given_more(calib):
    """train_data replaces the calibration tokens for the healing only: the method calibrates on ``calib``
    as before (the same compressed start), the healing sees every row of train_data; heal_data is its old
    name and gives the same run."""
    more = torch.cat([calib, calib.flip(1)])
    config = fk.SVDLLMConfig(ratio=0.3, heal=2)
    plain = fk.compress(tiny_llama(), config, calib, progress=False).fit["heal"]
    healed = fk.compress(tiny_llama(), config, calib, train_data=more, progress=False).fit["heal"]
    assert plain["sequences"] == calib.shape[0] and healed["sequences"] == more.shape[0]
    assert healed["losses"] != plain["losses"]
    assert fk.compress(tiny_llama(), config, calib, heal_data=more, progress=False).fit["heal"]["losses"] == \
        healed["losses"]
    with pytest.raises(fk.FactorkitError, match="train_data is only used when compress.. trains"):
        fk.compress(tiny_llama(), fk.SVDLLMConfig(ratio=0.3), calib, train_data=more, progress=False)
    with pytest.raises(fk.FactorkitError, match="old name of train_data"):
        fk.compress(tiny_llama(), config, calib, train_data=more, heal_data=more, progress=False)


def test_dsformer_trains_on_its_own_text_and_starts_from_the_calibration(calib):
    """DSFormer's start (its Grams) comes from ``data`` whatever train_data is; the training takes train_data's
    rows: the first step's loss, on the same start, differs, and the run reports train_data's sequences."""
    more = torch.cat([calib.flip(1), calib.roll(5, dims=1)])
    config = fk.DSFormerConfig(ratio=0.3, train=TrainConfig(steps=2, lr=1e-3, batch_size=4))
    assert config.training_sequences() == 8
    plain = fk.compress(tiny_llama(), config, calib, progress=False).fit
    own = fk.compress(tiny_llama(), config, calib, train_data=more, progress=False).fit
    assert plain["sequences"] == calib.shape[0] and own["sequences"] == more.shape[0]
    assert own["losses"][0] != plain["losses"][0]
    # no training data changes the start: trained for 0 effective steps (lr 0) both runs end on the same factors
    frozen = dataclasses.replace(config, train=TrainConfig(steps=1, lr=1e-30, batch_size=4))
    a, b = tiny_llama(), tiny_llama()
    fk.compress(a, frozen, calib, progress=False)
    fk.compress(b, frozen, calib, train_data=more, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_job_draws_one_training_window_per_sequence_a_run_takes(model_dir, text_file):
    """By default a job's training (healing, DSFormer's) draws steps x batch x accumulation windows of the
    calibration text, so none repeats, whatever --calib-samples the method's statistics take."""
    job = dict(model=str(model_dir), calib=str(text_file), calib_samples=4, calib_seq_len=32)
    heal = fk.run(fk.CompressJob(method=fk.SVDLLMConfig(ratio=0.3, heal=3), **job), progress=False)
    assert heal.compression.fit["heal"]["sequences"] == 3 * 4  # heal batch 4
    dsf = fk.DSFormerConfig(ratio=0.3, train=TrainConfig(steps=2, batch_size=3, grad_accum=2))
    assert fk.run(fk.CompressJob(method=dsf, **job), progress=False).compression.fit["sequences"] == 12
    fixed = fk.run(fk.CompressJob(method=dsf, train_samples=5, **job), progress=False)
    assert fixed.compression.fit["sequences"] == 5


@pytest.mark.parametrize("argv, expected", [
    (["--method", "svdllm", "--heal-lr", "1e-3"], "--heal-lr applies only with --heal above 0"),
    (["--method", "svdllm", "--heal-samples", "64"], "--heal-samples applies only when the compression trains"),
    (["--method", "svdllm", "--train-samples", "64"], "--train-samples applies only when the compression trains"),
    (["--method", "svdllm", "--heal", "2", "--heal-samples", "8", "--train-samples", "9"],
     "--heal-samples is the old name of --train-samples"),
    (["--method", "dsformer", "--heal", "5"], "dsformer trains its factors already"),
    (["--method", "svdllm", "--heal", "-1"], "--heal must be a whole number of at least 0"),
])
def test_healing_options_are_refused_in_one_sentence(argv, expected, capsys, tmp_path):
    code = main(["-q", "compress", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_heal_from_the_command_line_records_its_settings(capsys, model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    out_dir = tmp_path / "healed"
    code = main(["-q", "compress", "--model", str(model_dir), "--method", "svd", "--ratio", "0.4", "--heal", "3",
                 "--heal-lr", "1e-3", "--calib", str(text_file), "--calib-samples", "4", "--calib-seq-len", "32",
                 "--train-samples", "12", "--out", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "healing loss (first and last of 3 steps on 12 sequences" in out
    record = fk.load(out_dir)
    config = fk.CompressionConfig.from_dict(fk.compression_record(record)["config"])
    assert config.heal == 3 and config.heal_train.lr == 1e-3


def test_a_large_vocabulary_trains_in_pieces_to_the_same_weights(calib):
    """With fewer logits allowed per pass than a micro-batch holds, each micro-batch runs in pieces of rows,
    weighted by their share: the losses and the trained weights are those of one pass (to float rounding),
    and no pass holds more logits than allowed."""
    dense = tiny_llama(seed=3)
    start = copy.deepcopy(dense)
    fk.compress(start, fk.SVDLLMConfig(ratio=0.6), calib, progress=False)
    config = dataclasses.replace(FAST, steps=6, grad_accum=2)
    seq, vocab = calib.shape[1], dense.config.vocab_size
    runs, passes = {}, []

    def loss_fn(m, batch):
        passes.append(batch.shape[0])
        return model_loss(m, batch, dense, config.distill, config.temperature)

    for max_logits in (None, seq * vocab):  # the whole micro-batch of 4 rows, then one row a pass
        model = copy.deepcopy(start)
        passes.clear()
        result = train(model, calib, factor_parameters(model), config, loss_fn, progress=False, max_logits=max_logits)
        runs[max_logits] = (result.losses, dict(factor_parameters(model)), list(passes))
    (one, w_one, p_one), (pieces, w_pieces, p_pieces) = runs[None], runs[seq * vocab]
    assert p_one == [4] * 12 and p_pieces == [1] * 48
    assert torch.allclose(torch.tensor(one), torch.tensor(pieces), rtol=1e-5)
    before = dict(factor_parameters(start))
    assert all(not torch.equal(p, before[name]) for name, p in w_one.items())  # it trained
    for name, p in w_one.items():
        torch.testing.assert_close(p, w_pieces[name], rtol=1e-4, atol=1e-6)
