"""The training loop's state on disk (safetensors + JSON, never a pickle, of this run only), the stop at
the first non-finite loss, TrainConfig's checks, perplexity's edge cases, and SLTrain's support checksum."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import factorkit as fk
from factorkit.errors import FactorkitError, NonFiniteLossError
from factorkit.eval.perplexity import perplexity
from factorkit.factors import factor_modules
from factorkit.training import TrainConfig, model_loss, train
from factorkit.training.sltrain import SLTrainConfig, parameterize

from conftest import tiny_llama


def _trained(model):
    """The MLPs and the norms: matrices with weight decay and vectors without."""
    return [(n, p) for n, p in model.named_parameters() if ".mlp." in n or "norm" in n]


def _run(data, ckpt=None, stop_after=None, model=None, run=None, loss_fn=model_loss, hint=None, **settings):
    model = model or tiny_llama()
    config = TrainConfig(**{"steps": 6, "lr": 1e-2, "batch_size": 2, "grad_accum": 2, "checkpoint_every": 2,
                            "seed": 7, "checkpoint_dir": ckpt and str(ckpt), **settings})
    extra = {k: v for k, v in (("run", run), ("nonfinite_hint", hint)) if v is not None}
    result = train(model, data, _trained(model), config, loss_fn, progress=False, stop_after=stop_after, **extra)
    return model, result


def _one_sentence(err) -> str:
    text = str(err.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0, text
    return text


def test_state_is_safetensors_and_json_and_resumes_bit_identically(calib, tmp_path):
    straight, full = _run(calib)
    _, first = _run(calib, tmp_path / "ck", stop_after=3)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["train_state-3.safetensors", "train_state.json"]
    meta = json.loads((tmp_path / "ck" / "train_state.json").read_text())
    assert meta["step"] == 3 and meta["losses"] == first.losses and meta["tensors"] == "train_state-3.safetensors"
    tensors = load_file(str(tmp_path / "ck" / "train_state-3.safetensors"))
    assert tensors["rng"].dtype == torch.uint8
    assert {k.rsplit(".", 1)[1] for k in tensors if k.startswith("optim.")} == {"exp_avg", "exp_avg_sq", "step"}
    resumed, second = _run(calib, tmp_path / "ck")
    assert second.resumed_from == 3 and second.losses == full.losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # the state of step 6 replaced that of step 3, its tensors file too
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["train_state-6.safetensors", "train_state.json"]


class _Payload:
    """What a crafted pickle does: run code while it is loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_an_old_pickled_state_is_refused_and_never_unpickled(calib, tmp_path):
    (tmp_path / "ck").mkdir()
    torch.save({"step": 1, "evil": _Payload(tmp_path / "marker")}, tmp_path / "ck" / "train_state.pt")
    with pytest.raises(Exception) as err:
        _run(calib, tmp_path / "ck")
    assert not (tmp_path / "marker").exists()
    assert err.type is FactorkitError and "old pickled format (train_state.pt)" in _one_sentence(err)


def _truncate(folder):
    path = folder / "train_state-2.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return path.name


def _bad_json(folder):
    (folder / "train_state.json").write_text('{"step": 2, ')
    return "train_state.json"


def _json_without_schedule(folder):
    meta = json.loads((folder / "train_state.json").read_text())
    del meta["schedule"]
    (folder / "train_state.json").write_text(json.dumps(meta))
    return "train_state.json"


def _edit_tensors(edit):
    def damage(folder):
        path = folder / "train_state-2.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))
        return path.name
    return damage


def _reshape_first_param(tensors):
    key = next(k for k in tensors if k.startswith("param."))
    tensors[key] = tensors[key].flatten()[:-1].contiguous()


@pytest.mark.parametrize("damage", [
    _truncate, _bad_json, _json_without_schedule,
    _edit_tensors(lambda t: t.pop("rng")),
    _edit_tensors(lambda t: t.pop(next(k for k in t if k.endswith(".exp_avg_sq")))),
    _edit_tensors(_reshape_first_param),
], ids=["truncated", "invalid-json", "missing-json-key", "missing-rng", "missing-moment", "shape"])
def test_a_damaged_state_is_refused_in_one_sentence_naming_the_file(calib, tmp_path, damage):
    _run(calib, tmp_path / "ck", stop_after=2)
    name = damage(tmp_path / "ck")
    with pytest.raises(FactorkitError, match="is not a readable training state") as err:
        _run(calib, tmp_path / "ck")
    assert name in _one_sentence(err)


@pytest.mark.parametrize("change", ["data", "lr", "seed", "warmup", "start", "run"])
def test_a_state_of_another_run_is_refused(calib, tmp_path, change):
    _run(calib, tmp_path / "ck", stop_after=2)
    other = {"data": {"data": calib.flip(0)}, "lr": {"lr": 2e-2}, "seed": {"seed": 8}, "warmup": {"warmup": 3},
             "start": {"model": tiny_llama(seed=1)}, "run": {"run": {"method": "b"}}}[change]
    kwargs = {"data": calib, **other}
    with pytest.raises(FactorkitError, match="holds the training state of another run") as err:
        _run(kwargs.pop("data"), tmp_path / "ck", **kwargs)
    _one_sentence(err)
    # where and how often to save is no part of the run: the same run resumes with another period
    _, resumed = _run(calib, tmp_path / "ck", checkpoint_every=3)
    assert resumed.resumed_from == 2


def test_training_stops_at_the_first_nonfinite_loss_and_saves_nothing_of_that_step(calib, tmp_path):
    calls = []

    def loss_fn(model, batch):  # NaN from step 3 on (two micro-batches a step)
        calls.append(1)
        loss = model_loss(model, batch)
        return loss * float("nan") if len(calls) > 4 else loss

    with pytest.raises(NonFiniteLossError) as err:
        _run(calib, tmp_path / "ck", loss_fn=loss_fn)
    assert _one_sentence(err) == "the training loss became nan at step 3; lower the learning rate or train in float32."
    # the state of step 2 (a valid, earlier one) is kept; step 3 is not saved
    assert json.loads((tmp_path / "ck" / "train_state.json").read_text())["step"] == 2
    assert not (tmp_path / "ck" / "train_state-3.safetensors").exists()


def test_a_nonfinite_gradient_stops_training_even_without_clipping(calib):
    model = tiny_llama()
    name, param = _trained(model)[0]
    param.register_hook(lambda grad: grad * float("inf"))  # the loss stays finite, the gradient does not
    before = param.detach().clone()
    with pytest.raises(NonFiniteLossError) as err:
        _run(calib, model=model, max_grad_norm=0.0, hint="lower --lr.")  # the caller's hint ends the sentence
    assert re.fullmatch(r"the training gradient norm became (nan|inf) at step 1; lower --lr\.", _one_sentence(err))
    assert torch.equal(param, before)  # the step was not taken


@pytest.mark.parametrize("field, value, message", [
    ("lr", math.inf, "lr must be a positive finite number, got inf."),
    ("lr", math.nan, "lr must be a positive finite number, got nan."),
    ("lr", 0.0, "lr must be a positive finite number, got 0.0."),
    ("distill", math.inf, "distill must be a finite number of at least 0, got inf."),
    ("distill", -1.0, "distill must be a finite number of at least 0"),
    ("temperature", 0.0, "temperature must be a positive finite number"),
    ("temperature", math.nan, "temperature must be a positive finite number"),
    ("weight_decay", -0.1, "weight_decay must be a finite number of at least 0"),
    ("max_grad_norm", math.inf, "max_grad_norm must be a finite number of at least 0"),
    ("warmup", -1, "warmup must be a whole number of at least 0, got -1."),
    ("steps", 0, "steps must be a whole number of at least 1"),
    ("steps", 2.5, "steps must be a whole number of at least 1, got 2.5."),
    ("batch_size", 0, "batch_size must be a whole number of at least 1"),
    ("grad_accum", True, "grad_accum must be a whole number of at least 1"),
    ("checkpoint_every", 0, "checkpoint_every must be a whole number of at least 1"),
])
def test_train_config_cannot_be_built_invalid(field, value, message):
    with pytest.raises(FactorkitError) as err:
        TrainConfig(**{field: value})
    assert _one_sentence(err).startswith(message)
    config = TrainConfig()
    setattr(config, field, value)  # changed after it was built: validate() checks again
    with pytest.raises(FactorkitError):
        config.validate()


def test_perplexity_of_a_huge_finite_loss_is_infinite(llama, calib):
    with torch.no_grad():
        llama.model.norm.weight.mul_(1e6)  # logits of ~1e5: a finite loss far past exp's range
    result = perplexity(llama, calib[:2], progress=False)
    assert math.isfinite(result.nll) and result.nll > 1000 and result.perplexity == math.inf


@pytest.mark.parametrize("bad, shown", [(300, 300), (-1, -1)])
def test_token_ids_outside_the_vocabulary_are_refused(llama, calib, bad, shown):
    ids = calib[:2].clone()
    ids[1, 5] = bad
    with pytest.raises(FactorkitError) as err:
        perplexity(llama, ids, progress=False)
    assert _one_sentence(err) == (f"token id {shown} is outside the model's vocabulary of 256; tokenize with the "
                                  "model's own tokenizer.")
    from factorkit.eval.perplexity import check_token_ids  # a check of its own, for every caller that runs a model

    check_token_ids(llama, calib)  # ids inside pass
    with pytest.raises(FactorkitError, match=f"token id {shown} "):
        check_token_ids(llama, ids)


def test_an_edited_sltrain_seed_is_refused_on_load(tmp_path):
    model = parameterize(tiny_llama(), SLTrainConfig(param="sltrain", rank=4))
    fk.save(model, tmp_path / "m")
    path = tmp_path / "m" / "factorkit.json"
    manifest = json.loads(path.read_text())
    specs = [s for s in manifest["modules"].values() if s["type"] == "sparse_low_rank"]
    assert specs and all(len(s["support_sha256"]) == 16 for s in specs)
    fk.load(tmp_path / "m")  # untouched: loads
    specs[0]["seed"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(FactorkitError, match="the sparse support rebuilt from seed") as err:
        fk.load(tmp_path / "m")
    _one_sentence(err)


def test_a_spec_without_a_support_checksum_still_loads(tmp_path):
    model = parameterize(tiny_llama(), SLTrainConfig(param="sltrain", rank=4))
    fk.save(model, tmp_path / "m")
    path = tmp_path / "m" / "factorkit.json"
    manifest = json.loads(path.read_text())
    for spec in manifest["modules"].values():
        spec.pop("support_sha256", None)  # as written before the checksum existed
    path.write_text(json.dumps(manifest))
    loaded = fk.load(tmp_path / "m")
    ids = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert len(list(factor_modules(loaded))) == 14
