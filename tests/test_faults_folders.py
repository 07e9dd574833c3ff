"""Folders under faults: factorkit replaces only what it wrote, fails before work
on a target it cannot write, leaves nothing half written, refuses damaged
folders with one sentence, and plain transformers never loads a factorized
folder silently wrong."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import factorkit as fk
from factorkit.adapters.wara import WaRAConfig, get_wara_model, save_adapter
from factorkit.errors import FactorkitError
from factorkit.models import checkpoint, files, partial
from factorkit.models.files import atomic_dir, atomic_file, check_writable_target

from conftest import tiny_llama


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_sentence(message: str) -> bool:
    return message.endswith(".") and "\n" not in message and "Traceback" not in message


# ------------------------------------------------------------ overwrite safety

def test_overwrite_refuses_a_hugging_face_folder_factorkit_did_not_write(llama, model_dir):
    before = snapshot(model_dir)
    with pytest.raises(FactorkitError, match="holds files factorkit did not write") as err:
        fk.save(llama, model_dir, overwrite=True)
    assert one_sentence(str(err.value)) and "choose another folder or empty it" in str(err.value)
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("kind", ["saved model", "wara adapter", "atomic_dir folder", "empty folder"])
def test_overwrite_replaces_folders_factorkit_wrote(llama, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "saved model":
        fk.save(tiny_llama(seed=1), out)
    elif kind == "wara adapter":  # recognised by the factorkit_version in its adapter_config.json
        save_adapter(get_wara_model(tiny_llama(seed=1), WaRAConfig(("q_proj",), r=2, wavelet="haar", levels=1)), out)
        assert json.loads((out / "adapter_config.json").read_text())["factorkit_version"] == fk.__version__
    elif kind == "atomic_dir folder":  # e.g. the PEFT LoRA folder of finetune --adapter lora: marked
        with atomic_dir(out) as tmp:
            (tmp / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        assert (out / files.MARKER).is_file()
    else:
        out.mkdir()
    fk.save(llama, out, overwrite=True)
    assert (out / "factorkit.json").is_file() and not (out / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_peft_folder_written_by_peft_itself_is_not_replaced(llama, tmp_path):
    out = tmp_path / "lora"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FactorkitError, match="did not write"):
        fk.save(llama, out, overwrite=True)
    assert (out / "adapter_config.json").is_file()


def test_the_input_model_is_never_the_target(llama, tmp_path, model_dir):
    with pytest.raises(FactorkitError, match="input model"):
        fk.models.save(llama, model_dir, overwrite=True, protect=model_dir)
    with pytest.raises(FactorkitError, match="input model"):  # nor a folder that holds it
        fk.models.save(llama, model_dir.parent, overwrite=True, protect=model_dir)
    # even a folder factorkit wrote, which overwrite may otherwise replace
    out = tmp_path / "out"
    fk.save(llama, out)
    shutil.copytree(model_dir, out / "input")
    before = snapshot(out)
    with pytest.raises(FactorkitError, match="is or holds the input model") as err:
        fk.models.save(llama, out, overwrite=True, protect=out / "input")
    assert one_sentence(str(err.value)) and snapshot(out) == before


def test_wara_adapter_never_replaces_its_base_model(llama, tmp_path):
    base = tmp_path / "base"
    fk.save(tiny_llama(), base)
    model = get_wara_model(llama, WaRAConfig(("q_proj",), r=2, wavelet="haar", levels=1))
    before = snapshot(base)
    with pytest.raises(FactorkitError, match="input model"):
        save_adapter(model, base, overwrite=True, base_model=str(base))
    assert snapshot(base) == before


# ------------------------------------------------------ unwritable and full

def test_target_under_a_file_is_refused_before_any_work(llama, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FactorkitError, match="is a file") as err:
        check_writable_target(tmp_path / "file" / "deeper" / "out", overwrite=False)
    assert one_sentence(str(err.value))
    with pytest.raises(FactorkitError, match="is a file"):
        fk.save(llama, tmp_path / "file" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a read-only /proc")
def test_target_in_a_read_only_folder_is_refused_before_any_work():
    with pytest.raises(FactorkitError, match="not writable") as err:
        check_writable_target(Path("/proc/factorkit-nowhere/out"), overwrite=False)
    assert one_sentence(str(err.value)) and "choose a folder you can write to" in str(err.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_target_in_a_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(FactorkitError, match="not writable"):
            check_writable_target(locked / "out", overwrite=False)
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("code, phrase", [(errno.ENOSPC, "not enough space to write"),
                                          (getattr(errno, "EDQUOT", errno.ENOSPC), "not enough space to write"),
                                          (errno.EIO, "could not write")])
def test_full_disk_while_writing_ends_in_one_sentence_and_nothing_partial(llama, tmp_path, monkeypatch, code, phrase):
    out = tmp_path / "out"
    fk.save(tiny_llama(seed=1), out)  # an earlier save that overwrite would replace
    before = snapshot(out)

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(checkpoint, "save_model", full)
    with pytest.raises(FactorkitError, match=phrase) as err:
        fk.save(llama, out, overwrite=True)
    assert one_sentence(str(err.value)) and str(out) in str(err.value)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_finished_groups_use_the_one_writer(tmp_path, monkeypatch):
    groups = partial.FinishedGroups(tmp_path / "ckpt", {"method": "cospadi"})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(partial, "save_file", full)
    with pytest.raises(FactorkitError, match="not enough space"):
        groups.store("0-1", [tiny_llama().model.layers[0]], {})
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["run.json"]


# --------------------------------------------- temporaries, sync, permissions

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writes_are_removed(llama, tmp_path):
    host, dead = socket.gethostname(), _dead_pid()
    names = {"dead tmp": f".out.tmp-{host}-{dead}-0a1b2c3d", "dead old": f".out.old-{host}-{dead}-4e5f6a7b",
             "live": f".out.tmp-{host}-{os.getpid()}-deadbeef", "other host": f".out.tmp-elsewhere-{dead}-01234567",
             "other target": f".outer.tmp-{host}-{dead}-89abcdef"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    fk.save(llama, tmp_path / "out")
    left = {p.name for p in tmp_path.iterdir()}
    assert names["dead tmp"] not in left and names["dead old"] not in left
    assert {names["live"], names["other host"], names["other target"], "out"} <= left


def test_a_killed_save_leaves_a_temporary_the_next_save_removes(llama, tmp_path):
    out = tmp_path / "out"
    script = ("import sys, time; from factorkit.models.files import atomic_dir\n"
              "with atomic_dir(sys.argv[1]) as tmp:\n"
              "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
              "    print('writing', flush=True); time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()) and not out.exists()
    fk.save(llama, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names synced files through /proc/self/fd")
def test_every_file_and_the_folder_are_synced_before_the_rename(llama, tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    fk.save(llama, tmp_path / "out")
    temporary = [Path(p) for p in synced if Path(p).parent.name.startswith(".out.tmp-")]
    assert {p.name for p in temporary} == {p.name for p in (tmp_path / "out").iterdir()}
    assert any(Path(p).name.startswith(".out.tmp-") for p in synced)  # the folder itself
    assert os.path.realpath(tmp_path) in synced  # and the rename, in its parent


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_written_folders_and_files_follow_the_umask(llama, tmp_path, umask_027):
    fk.save(llama, tmp_path / "out")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    with atomic_file(tmp_path / "run.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------ damaged folders

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Two saved folders: SVD (low rank) and CoSpaDi with one dictionary shared by both blocks."""
    root = tmp_path_factory.mktemp("pristine")
    low = tiny_llama()
    fk.compress(low, fk.SVDConfig(ratio=0.3), None, progress=False)
    fk.save(low, root / "lowrank")
    shared = tiny_llama()
    fk.compress(shared, fk.CoSpaDiConfig(ratio=0.3, iterations=2, group=2, whiten=False), None, progress=False)
    fk.save(shared, root / "dictionary")
    assert json.loads((root / "dictionary" / "factorkit.json").read_text())["tied"]
    return root


Q = "model.layers.0.self_attn.q_proj"


def _json(file: str, edit):
    def damage(folder: Path) -> None:
        data = json.loads((folder / file).read_text())
        edit(data)
        (folder / file).write_text(json.dumps(data))
    return damage


def _spec(**changes):
    return _json("factorkit.json", lambda m: m["modules"][Q].update(changes))


def _base(**changes):
    return _json("config.json", lambda c: c["factorkit_base_config"].update(changes))


def _tensors(edit):
    def damage(folder: Path) -> None:
        state = load_file(str(folder / "model.safetensors"))
        edit(state)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return damage


def _bytes(edit):
    def damage(folder: Path) -> None:
        file = folder / "model.safetensors"
        file.write_bytes(edit(file.read_bytes()))
    return damage


def _header_replace(old: bytes, new: bytes):
    def edit(data: bytes) -> bytes:
        n = int.from_bytes(data[:8], "little")
        assert old in data[8:8 + n]
        return data[:8] + data[8:8 + n].replace(old, new, 1) + data[8 + n:]
    return _bytes(edit)


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


def _support(fill: int):
    def edit(state):
        state[f"{Q}.support"][0] = fill  # row 0 with every bit set, or none
    return _tensors(edit)


# (folder, damage, file the message must name, key phrase)
DAMAGES = {
    "weights deleted": ("lowrank", lambda f: (f / "model.safetensors").unlink(), "model.safetensors", "missing"),
    "weights empty": ("lowrank", _bytes(lambda d: b""), "model.safetensors", "damaged"),
    "weights cut in the length": ("lowrank", _bytes(lambda d: d[:5]), "model.safetensors", "damaged"),
    "weights cut in the header": ("lowrank", _bytes(lambda d: d[:40]), "model.safetensors", "damaged"),
    "weights cut in the data": ("lowrank", _bytes(lambda d: d[:len(d) // 2]), "model.safetensors", "damaged"),
    "weights cut by one byte": ("lowrank", _bytes(lambda d: d[:-1]), "model.safetensors", "damaged"),
    "weights with bytes appended": ("lowrank", _bytes(lambda d: d + b"\0" * 7), "model.safetensors", "damaged"),
    "header length garbled": ("lowrank", _bytes(lambda d: b"\xff" * 8 + d[8:]), "model.safetensors", "damaged"),
    "header json garbled": ("lowrank", _header_replace(b'":', b'"#'), "model.safetensors", "damaged"),
    "header dtype edited": ("lowrank", _header_replace(b'"F32"', b'"I32"'), "model.safetensors", "damaged"),
    "header tensor renamed": ("lowrank", _header_replace(b'"lm_head.weight":{', b'"lm_head.weighx":{'),
                              "model.safetensors", "damaged"),
    "tensor missing": ("lowrank", _tensors(lambda s: s.pop(f"{Q}.U")), "model.safetensors", "missing"),
    "tensor unexpected": ("lowrank", _tensors(_set("extra.weight", torch.zeros(2))), "model.safetensors",
                          "unexpected"),
    "tensor reshaped": ("lowrank", _tensors(_set(f"{Q}.U", torch.zeros(32, 3))),
                        "model.safetensors", "damaged"),
    "mask stored as float": ("dictionary", _tensors(lambda s: s.__setitem__(f"{Q}.support", s[f"{Q}.support"].float())),
                             "model.safetensors", "damaged"),
    "support row full": ("dictionary", _support(255), "model.safetensors", "support mask"),
    "support row empty": ("dictionary", _support(0), "model.safetensors", "support mask"),
    "manifest deleted": ("lowrank", lambda f: (f / "factorkit.json").unlink(), "factorkit.json", "factorkit.json"),
    "manifest empty": ("lowrank", lambda f: (f / "factorkit.json").write_text(""), "factorkit.json", "not valid JSON"),
    "manifest cut": ("lowrank", lambda f: (f / "factorkit.json").write_text((f / "factorkit.json").read_text()[:50]),
                     "factorkit.json", "not valid JSON"),
    "manifest a list": ("lowrank", lambda f: (f / "factorkit.json").write_text("[]"), "factorkit.json", "damaged"),
    "manifest without modules": ("lowrank", _json("factorkit.json", lambda m: m.pop("modules")), "factorkit.json",
                                 "modules"),
    "manifest without architecture": ("lowrank", _json("factorkit.json", lambda m: m.pop("architecture")),
                                      "factorkit.json", "architecture"),
    "format version a string": ("lowrank", _json("factorkit.json", lambda m: m.update(format_version="1")),
                                "factorkit.json", "format_version"),
    "format version from the future": ("lowrank", _json("factorkit.json", lambda m: m.update(format_version=99)),
                                       "factorkit.json", "newer factorkit"),
    "compression not an object": ("lowrank", _json("factorkit.json", lambda m: m.update(compression=[1])),
                                  "factorkit.json", "compression"),
    "dtype unknown": ("lowrank", _json("factorkit.json", lambda m: m.update(dtype="float8")), "factorkit.json",
                      "dtype"),
    "architecture unknown": ("lowrank", _json("factorkit.json", lambda m: m.update(architecture="NoSuchForCausalLM")),
                             "factorkit.json", "does not have"),
    "architecture not a model": ("lowrank", _json("factorkit.json", lambda m: m.update(architecture="AutoConfig")),
                                 "factorkit.json", "does not have"),
    "architecture of another family": ("lowrank", _json("factorkit.json",
                                                        lambda m: m.update(architecture="GPT2LMHeadModel")),
                                       "config.json", "damaged"),
    "module without a body": ("lowrank", _json("factorkit.json", lambda m: m["modules"].update({Q: 3})),
                              "factorkit.json", "damaged"),
    "factor type unknown": ("lowrank", _spec(type="hypercomplex"), "factorkit.json", "unknown to this factorkit"),
    "rank negative": ("lowrank", _spec(rank=-4), "factorkit.json", "rank"),
    "rank zero": ("lowrank", _spec(rank=0), "factorkit.json", "rank"),
    "rank a string": ("lowrank", _spec(rank="8"), "factorkit.json", "rank"),
    "rank a fraction": ("lowrank", _spec(rank=8.5), "factorkit.json", "rank"),
    "rank off by one": ("lowrank", _spec(rank=9), "factorkit.json", "damaged"),
    "in_features edited": ("lowrank", _spec(in_features=33), "factorkit.json", "damaged"),
    "bias switched on": ("lowrank", _spec(bias=True), "factorkit.json", "missing"),
    "spec key unknown": ("lowrank", _spec(colour="red"), "factorkit.json", "damaged"),
    "spec key removed": ("lowrank", _json("factorkit.json", lambda m: m["modules"][Q].pop("rank")),
                         "factorkit.json", "damaged"),
    "module renamed": ("lowrank", _json("factorkit.json", lambda m: m["modules"].update(
        {"model.nowhere.q_proj": m["modules"].pop(Q)})), "factorkit.json", "damaged"),
    "module dropped": ("lowrank", _json("factorkit.json", lambda m: m["modules"].pop(Q)), "factorkit.json",
                       "unexpected"),
    "sparsity above atoms": ("dictionary", _spec(sparsity=1000), "factorkit.json", "sparsity"),
    "sparsity edited": ("dictionary", _spec(sparsity=3), "factorkit.json", "damaged"),
    "atoms edited": ("dictionary", _spec(atoms=40), "factorkit.json", "damaged"),
    "blocks not dividing": ("dictionary", _spec(blocks=5), "factorkit.json", "damaged"),
    "tie removed": ("dictionary", _json("factorkit.json", lambda m: m["tied"].pop(next(iter(m["tied"])))),
                    "factorkit.json", "missing"),
    "tie to nothing": ("dictionary", _json("factorkit.json", lambda m: m["tied"].update(
        {next(iter(m["tied"])): "model.layers.0.self_attn.nowhere.atoms"})), "factorkit.json", "damaged"),
    "tie across shapes": ("dictionary", _json("factorkit.json", lambda m: m["tied"].update(
        {"model.layers.1.mlp.down_proj.atoms": "model.layers.0.self_attn.q_proj.atoms"})), "factorkit.json",
        "damaged"),
    "tie not a name": ("dictionary", _json("factorkit.json", lambda m: m["tied"].update({Q: 7})), "factorkit.json",
                       "tied"),
    "config deleted": ("lowrank", lambda f: (f / "config.json").unlink(), "config.json", "missing"),
    "config cut": ("lowrank", lambda f: (f / "config.json").write_text("{\"model_type\": "), "config.json",
                   "not valid JSON"),
    "config model type unknown": ("lowrank", _base(model_type="nosuchmodel"), "config.json", "model type"),
    "config base removed": ("lowrank", _json("config.json", lambda c: c.pop("factorkit_base_config")), "config.json",
                            "model type"),
    "config hidden size edited": ("lowrank", _base(hidden_size=48), "config.json", "damaged"),
    "config layers edited": ("lowrank", _base(num_hidden_layers=3), "config.json", "missing"),
    "config activation unknown": ("lowrank", _base(hidden_act="sparkle"), "config.json", "damaged"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_folder_ends_in_one_sentence_naming_the_file(pristine, tmp_path, case):
    source, damage, file, phrase = DAMAGES[case]
    folder = tmp_path / source
    shutil.copytree(pristine / source, folder)
    damage(folder)
    before = snapshot(tmp_path)
    with pytest.raises(FactorkitError, match=phrase) as err:
        fk.load(folder)
    message = str(err.value)
    assert file in message and one_sentence(message), message
    assert snapshot(tmp_path) == before  # nothing written, nothing deleted


@pytest.mark.parametrize("damage", [_spec(rank=10 ** 9), _spec(in_features=10 ** 9), _base(vocab_size=10 ** 9),
                                    _base(intermediate_size=10 ** 9)],
                         ids=["rank", "in_features", "vocab_size", "intermediate_size"])
def test_a_huge_edited_dimension_fails_fast_without_allocating(pristine, tmp_path, damage):
    folder = tmp_path / "lowrank"
    shutil.copytree(pristine / "lowrank", folder)
    damage(folder)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(FactorkitError, match="damaged"):
        fk.load(folder)
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # kB on Linux: under 100 MB


def test_the_undamaged_folders_load(pristine):
    for name in ("lowrank", "dictionary"):
        fk.load(pristine / name)


# ------------------------------------------------------- plain transformers

@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into HF_MODULES_CACHE; keep it in the test's folder, never prompt."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(dynamic, "TIME_OUT_REMOTE_CODE", 0)  # what CI gets: refuse instead of asking
    return tmp_path / "modules"


def test_plain_transformers_refuses_a_factorized_folder_and_loads_it_with_remote_code(
        llama, calib, tmp_path, tokenizer, modules_cache):
    fk.compress(llama, fk.SVDLLMConfig(ratio=0.3), calib, progress=False)
    fk.save(llama, tmp_path / "out", tokenizer=tokenizer)
    for trust in (None, False):
        with pytest.raises(ValueError):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=trust)
    expected = fk.load(tmp_path / "out")(input_ids=calib[:2]).logits
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert torch.equal(remote(input_ids=calib[:2]).logits, expected)
    # the tokenizer still loads the plain way, and factorkit's loader reads the folder with it
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("fair is foul")["input_ids"]
    model, tok = fk.models.load(tmp_path / "out")
    assert tok is not None and torch.equal(model(input_ids=calib[:2]).logits, expected)


def test_a_model_without_factor_modules_stays_a_plain_hugging_face_folder(llama, calib, tmp_path, tokenizer,
                                                                           modules_cache):
    fk.save(llama, tmp_path / "dense", tokenizer=tokenizer)
    assert not (tmp_path / "dense" / checkpoint.REMOTE_CODE).exists()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.equal(plain(input_ids=calib[:2]).logits, llama(input_ids=calib[:2]).logits)


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                         ("float32", torch.float32)])
def test_model_loader_takes_dtype_names(model_dir, name, dtype):
    model, _ = fk.models.load(model_dir, name)
    assert model.model.embed_tokens.weight.dtype == dtype


def test_a_saved_folder_loads_in_a_dtype_named_by_string(llama, calib, tmp_path):
    fk.compress(llama, fk.SVDConfig(ratio=0.3), None, progress=False)
    fk.save(llama, tmp_path / "out")
    model, _ = fk.models.load(tmp_path / "out", "bfloat16")
    assert model.model.layers[0].self_attn.q_proj.U.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["int8", "fp32", torch.int64, 16])
def test_unknown_dtype_lists_the_choices(model_dir, dtype):
    with pytest.raises(FactorkitError, match="choose one of float32, bfloat16, float16") as err:
        fk.models.load(model_dir, dtype)
    assert one_sentence(str(err.value))
