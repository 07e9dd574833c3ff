"""factorkit compress --offload: blocks read from disk one at a time, the saved folder identical to the
in-memory run's, and what it cannot do refused before any work."""

import pytest
import torch
from safetensors.torch import load_file

import factorkit as fk
from factorkit.cli import main
from factorkit.models import offload


def _compress(model_dir, text_file, out, method, *extra):
    args = ["-q", "compress", "--model", str(model_dir), "--method", method, "--ratio", "0.3", "--calib",
            str(text_file), "--calib-samples", "6", "--calib-seq-len", "32", *extra, "--out", str(out)]
    if method == "cospadi":
        args += ["--iterations", "2"]
    return main(args)


@pytest.mark.parametrize("method,tied", [("svdllm", True), ("cospadi", True), ("svdllm", False)])
def test_offloaded_compression_saves_the_in_memory_tensors_holding_one_block(model_dir, text_file, tmp_path,
                                                                             monkeypatch, method, tied):
    if not tied:  # a head of its own, stored in the checkpoint beside the embedding
        model = fk.models.load(model_dir)[0]
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 1.5)
        model.save_pretrained(model_dir)
        assert "lm_head.weight" in load_file(model_dir / "model.safetensors")
    held = []
    materialize = offload.OffloadedBlocks.materialize

    def watched(self, index, block):
        outside = [n for n, t in self.model.state_dict().items()
                   if not n.startswith(self.list_name + ".") and not t.is_meta]
        held.append((index, list(offload.blocks_in_memory(self.model)), outside))  # in memory before this block
        materialize(self, index, block)
    monkeypatch.setattr(offload.OffloadedBlocks, "materialize", watched)
    assert _compress(model_dir, text_file, tmp_path / "memory", method) == 0
    assert _compress(model_dir, text_file, tmp_path / "offload", method, "--offload") == 0
    assert held == [(0, [], []), (1, [], [])]  # each block read in its turn, no other weights in memory then
    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("memory", "offload"))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key
    x = torch.randint(0, 200, (2, 12))
    assert torch.equal(fk.load(tmp_path / "memory")(x).logits, fk.load(tmp_path / "offload")(x).logits)
    assert not list(tmp_path.glob(".factorkit-offload-*"))  # the work folder is gone


@pytest.mark.parametrize("extra,message", [
    (["--eval", "shakespeare"], "--eval needs the whole model in memory and does not combine with --offload"),
    (["--quantize", "int8"], "--quantize needs the whole model in memory and does not combine with --offload"),
    (["--method", "fwsvd"], "--offload/--no-offload works with svdllm, asvd, cospadi (block by block), not fwsvd"),
    (["--allocation", "global"], "--offload/--no-offload works with uniform ratios only"),
])
def test_what_offload_cannot_do_is_refused_in_one_sentence(model_dir, text_file, tmp_path, capsys, extra, message):
    args = ["compress", "--model", str(model_dir), "--method", "svdllm", "--ratio", "0.3", "--calib", str(text_file),
            "--offload", "--out", str(tmp_path / "out")]
    if "--method" in extra:
        args[args.index("--method") + 1] = extra[1]
        extra = []
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_offload_needs_a_folder_of_safetensors(model_dir, text_file, tmp_path, capsys):
    _compress(model_dir, text_file, tmp_path / "compressed", "svdllm")
    code = _compress(tmp_path / "compressed", text_file, tmp_path / "again", "svdllm", "--offload")
    assert code == 2
    assert "--offload reads a Hugging Face folder of safetensors weights" in capsys.readouterr().err
    assert not list(tmp_path.glob(".factorkit-offload-*")) and not (tmp_path / "again").exists()
