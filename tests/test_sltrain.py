"""SLTrain: the sparse + low-rank layer, its memory, and pretraining on one
process, on two (gloo DDP), through the command line and after a resume."""

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import factorkit as fk
from factorkit.cli import main
from factorkit.errors import FactorkitError
from factorkit.eval import peak_memory
from factorkit.factors import LowRankLinear, SparseLowRankLinear, factor_modules
from factorkit.training.sltrain import SLTrainConfig, parameterize
from factorkit.solvers.sparsity import random_support
from factorkit.workflows.pretrain import PretrainConfig, leave_distributed, pretrain

from conftest import with_train, SAMPLE_TEXT, free_port, tiny_llama

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64}


def test_support_is_a_function_of_the_seed():
    a = SparseLowRankLinear(48, 40, rank=4, density=0.05, seed=7)
    b = SparseLowRankLinear(48, 40, rank=4, density=0.05, seed=7)
    c = SparseLowRankLinear(48, 40, rank=4, density=0.05, seed=8)
    assert torch.equal(a.support, b.support) and not torch.equal(a.support, c.support)
    assert torch.equal(a.support, random_support(40, 48, 0.05, 7))
    assert a.support.numel() == a.values.numel() == round(0.05 * 40 * 48)
    assert bool((a.support[1:] > a.support[:-1]).all())  # sorted, no repeats
    # the paper's start: B = 0, so W is the sparse part alone, with exactly the support's nonzeros
    assert torch.equal(a.dense_weight(), a.sparse_weight())
    assert int((a.dense_weight() != 0).sum()) == a.support.numel()


def test_support_survives_save_and_load(tmp_path):
    model = parameterize(tiny_llama(), SLTrainConfig(param="sltrain", rank=4, density=0.1, seed=3))
    for _, m in factor_modules(model):
        torch.nn.init.normal_(m.B, std=0.1)  # a trained-looking low-rank part
    fk.save(model, tmp_path / "m")
    assert not any("support" in k for k in load_file(str(tmp_path / "m" / "model.safetensors")))  # never stored
    loaded = fk.load(tmp_path / "m")
    pairs = list(zip(factor_modules(model), factor_modules(loaded)))
    assert len(pairs) == 2 * 7
    for (_, a), (_, b) in pairs:
        assert torch.equal(a.support, b.support)
    ids = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    # every layer has its own support
    supports = {tuple(m.support[:8].tolist()) for _, m in factor_modules(model) if m.support.numel() >= 8}
    assert len(supports) > 1


@pytest.mark.parametrize("bias", [False, True])
def test_custom_backward_matches_autograd_through_dense_weight(bias):
    torch.manual_seed(0)
    layer = SparseLowRankLinear(24, 16, rank=3, density=0.2, seed=1, alpha=6.0, bias=bias, dtype=torch.float64)
    torch.nn.init.normal_(layer.B)
    reference = SparseLowRankLinear(24, 16, rank=3, density=0.2, seed=1, alpha=6.0, bias=bias,
                                    memory_efficient=False, dtype=torch.float64)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    grad_out = torch.randn(3, 5, 16, dtype=torch.float64)
    grads = []
    for module in (layer, reference):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(grad_out)
        grads.append([y, xi.grad] + [p.grad for p in module.parameters()])
    assert len(grads[0]) == 5 + bias
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    # and the reference really is W = (alpha / r) B A + S applied as a dense Linear
    W = 2.0 * layer.B @ layer.A + layer.sparse_weight()
    torch.testing.assert_close(grads[0][0], torch.nn.functional.linear(x, W, layer.bias))


def test_peak_memory_below_dense_reference():
    """Autograd through an explicit W keeps one dense (out x in) matrix per layer
    alive until backward; the custom function keeps only the factors."""
    torch.manual_seed(0)
    layers, size = 4, 512
    peaks = {}
    for efficient in (True, False):
        stack = [SparseLowRankLinear(size, size, 32, 0.03, seed=i, memory_efficient=efficient) for i in range(layers)]
        for m in stack:
            torch.nn.init.normal_(m.B, std=0.02)
        x = torch.randn(16, size)

        def step():
            h = x
            for m in stack:
                h = torch.relu(m(h))
            h.sum().backward()

        step()  # warm-up; then free the gradients so both runs start alike
        for m in stack:
            for p in m.parameters():
                p.grad = None
        peaks[efficient] = peak_memory(step)
    dense_matrix = size * size * 4
    assert peaks[False] - peaks[True] >= (layers - 2) * dense_matrix, peaks


def test_parameterizations_count_what_they_store():
    base = tiny_llama()
    dense = {n: p.numel() for n, p in base.named_parameters()}
    low = parameterize(tiny_llama(), SLTrainConfig(param="lowrank", rank=4))
    slt = parameterize(tiny_llama(), SLTrainConfig(param="sltrain", rank=4, density=0.05))
    assert parameterize(tiny_llama(), SLTrainConfig(param="full")) is not None
    for name, m in factor_modules(low):
        assert isinstance(m, LowRankLinear) and m.param_count() == 4 * (m.in_features + m.out_features)
    for name, m in factor_modules(slt):
        assert m.param_count() == 4 * (m.in_features + m.out_features) + round(0.05 * m.in_features * m.out_features)
    # embeddings, norms and the head stay full rank and untouched in shape
    kept = {n: p.numel() for n, p in slt.named_parameters() if "layers" not in n or "norm" in n}
    assert all(dense[n] == k for n, k in kept.items())
    with pytest.raises(fk.FactorkitError, match="density"):
        parameterize(tiny_llama(), SLTrainConfig(param="sltrain", density=1.5))
    with pytest.raises(fk.FactorkitError, match="exceeds the smallest"):
        parameterize(tiny_llama(), SLTrainConfig(param="sltrain", rank=1000))


# --- pretraining -----------------------------------------------------------------------------

@pytest.fixture
def tiny_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORKIT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "plays.txt"
    text.write_text(SAMPLE_TEXT)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    return text, config


def _config(text, config, **kw) -> PretrainConfig:
    settings = dict(model=str(config), param="sltrain", rank=4, density=0.1, text=str(text), tokenizer="bpe-300",
                    seq_len=16, batch_size=4, steps=6, lr=3e-3, warmup=2, eval_every=3, eval_rows=4, seed=0, device="cpu")
    settings.update(kw)
    return with_train(PretrainConfig, **settings)


def _ddp_worker(rank: int, world: int, port: int, config: PretrainConfig, out: str, cache: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "FACTORKIT_CACHE": cache})
    torch.set_num_threads(1)
    result = pretrain(config, progress=False)
    torch.save({"state": result.model.state_dict(), "losses": result.losses}, f"{out}/rank{rank}.pt")
    leave_distributed()


def test_two_process_ddp_matches_one_process(tiny_setup, tmp_path):
    text, config = tiny_setup
    cfg = _config(text, config, steps=4, grad_accum=2)
    single = pretrain(cfg, progress=False)
    mp.spawn(_ddp_worker, args=(2, free_port(), cfg, str(tmp_path), os.environ["FACTORKIT_CACHE"]), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key  # identical across ranks
        torch.testing.assert_close(value, single.model.state_dict()[key], rtol=1e-4, atol=1e-6)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # both log the global mean
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    assert single.losses[-1] < single.losses[0]


def test_resume_gives_the_uninterrupted_run(tiny_setup, tmp_path):
    text, config = tiny_setup
    full = pretrain(_config(text, config), progress=False)
    ckpt = str(tmp_path / "ckpt")
    cfg = _config(text, config, checkpoint_dir=ckpt, checkpoint_every=2)
    first = pretrain(cfg, progress=False, stop_after=4)
    assert len(first.losses) == 4 and [e["step"] for e in first.evals] == [3]
    resumed = pretrain(cfg, progress=False)
    assert resumed.losses == full.losses
    # the summary covers the whole run: the tokens of the steps before the resume count too
    assert resumed.summary()["tokens"] == full.summary()["tokens"] > resumed.tokens
    assert resumed.summary()["seconds"] > resumed.seconds
    assert resumed.evals == full.evals and [e["step"] for e in resumed.evals] == [3, 6]
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def run(capsys, *argv):
    capsys.readouterr()
    code = main(["-q", *map(str, argv)])
    return (code, *capsys.readouterr())


def test_cli_pretrain_saves_a_model_that_reloads(capsys, tiny_setup, tmp_path):
    text, config = tiny_setup
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "pretrain", "--config", config, "--param", "sltrain", "--rank", 4, "--delta", 0.1,
                            "--text", text, "--tokenizer", "bpe-300", "--seq-len", 16, "--batch-size", 4,
                            "--steps", 6, "--warmup", 2, "--eval-every", 3, "--eval-rows", 4, "--memory", "--device", "cpu",
                            "--out", out)
    assert code == 0, err
    assert "held-out perplexity" in stdout and "AdamW state" in stdout
    api = pretrain(_config(text, config), progress=False)  # same settings through the API
    loaded = fk.load(out)
    ids = torch.randint(0, 300, (2, 16))
    assert torch.equal(loaded(ids).logits, api.model.eval()(ids).logits)


@pytest.mark.parametrize("args, expected", [
    (["--delta", "1.5"], "must lie in (0, 1)"),
    (["--config", "llama-7b"], "unknown model config"),
    (["--tokenizer", "bpe-100"], "more than 256 tokens"),
    (["--batch-size", "4096"], "fewer than one batch"),
])
def test_cli_pretrain_bad_input(capsys, tiny_setup, tmp_path, args, expected):
    text, config = tiny_setup
    argv = ["pretrain", "--config", config, "--text", text, "--tokenizer", "bpe-300", "--seq-len", 16,
            "--steps", 2, "--out", tmp_path / "out", *args]
    code, _, err = run(capsys, *argv)
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def _fsdp_worker(rank: int, world: int, port: int, config: PretrainConfig, out: str, cache: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "FACTORKIT_CACHE": cache})
    torch.set_num_threads(1)
    ckpt = Path(config.train.checkpoint_dir)
    first = pretrain(config, progress=False, stop_after=2)  # interrupted after step 2 (a sharded DCP state) ...
    if rank == 0:
        shutil.copytree(ckpt, Path(out) / "dcp-at-2")  # kept for the one-process resume in the test
    torch.distributed.barrier()
    result = pretrain(config, progress=False)  # ... and resumed from it, sharded again
    # a gathered (single-file) state written by one process resumes sharded too
    gathered = pretrain(replace(config, train=replace(config.train, checkpoint_dir=str(Path(out) / "gathered"))),
                        progress=False)
    torch.save({"state": result.model.state_dict(), "losses": result.losses, "first": first.losses,
                "gathered": gathered.model.state_dict(), "gathered_losses": gathered.losses,
                "resumed_from_sharded": any(type(p).__name__ == "DTensor" for p in first.model.parameters())},
               f"{out}/rank{rank}.pt")
    leave_distributed()


def test_two_process_fsdp_dcp_state_resumes_on_one_process(tiny_setup, tmp_path):
    text, config = tiny_setup
    single = pretrain(_config(text, config, steps=4, grad_accum=2), progress=False)
    # a one-process state at step 2 in the single-file format, for the sharded run to resume from
    pretrain(_config(text, config, steps=4, grad_accum=2, checkpoint_dir=str(tmp_path / "gathered"), checkpoint_every=1),
             progress=False, stop_after=2)
    ckpt = tmp_path / "ckpt"
    cfg = _config(text, config, steps=4, grad_accum=2, parallel="fsdp", checkpoint_dir=str(ckpt), checkpoint_every=1)
    mp.spawn(_fsdp_worker, args=(2, free_port(), cfg, str(tmp_path), os.environ["FACTORKIT_CACHE"]), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert not ranks[0]["resumed_from_sharded"]  # the result is a whole, plain model on every process
    assert ranks[0]["first"] == ranks[0]["losses"][:2] and len(ranks[0]["losses"]) == 4
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
        torch.testing.assert_close(value, single.model.state_dict()[key], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ranks[0]["gathered"][key], single.model.state_dict()[key], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ranks[0]["gathered_losses"]), torch.tensor(single.losses),
                               rtol=1e-5, atol=1e-6)
    # the sharded state: one safetensors file per process, no pickled DCP .metadata, nothing gathered
    saved = tmp_path / "dcp-at-2"
    state = json.loads((saved / "train_state.json").read_text())
    assert state["format"] == "dcp" and state["step"] == 2
    files = sorted(p.name for p in (saved / state["tensors"]).iterdir())
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files), files
    assert not list(saved.rglob(".metadata")) and not list(saved.glob("*.safetensors"))
    # saved on 2 processes, resumed on 1: the same run as the uninterrupted one
    one = pretrain(_config(text, config, steps=4, grad_accum=2, checkpoint_dir=str(saved), checkpoint_every=1),
                   progress=False)
    assert one.summary()["tokens"] == 2 * one.tokens  # it trained steps 3 and 4 only
    torch.testing.assert_close(torch.tensor(one.losses), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(one.model.state_dict()[key], value, rtol=1e-4, atol=1e-6)
    # the state it leaves is single-file again, and the DCP folder is gone
    state = json.loads((saved / "train_state.json").read_text())
    assert state["step"] == 4 and "format" not in state and not (saved / "train_state-2").exists()


def test_damaged_dcp_state_is_refused(tiny_setup, tmp_path):
    """A state whose JSON names a DCP folder that is not there: one sentence, not a DCP traceback."""
    text, config = tiny_setup
    ckpt = tmp_path / "ckpt"
    cfg = _config(text, config, steps=4, checkpoint_dir=str(ckpt), checkpoint_every=1)
    pretrain(cfg, progress=False, stop_after=1)
    state = json.loads((ckpt / "train_state.json").read_text())
    (ckpt / "train_state-1.safetensors").unlink()
    (ckpt / "train_state.json").write_text(json.dumps({**state, "format": "dcp", "tensors": "train_state-1"}))
    with pytest.raises(FactorkitError, match="not a readable training state"):
        pretrain(cfg, progress=False)
