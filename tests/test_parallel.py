"""Solves shared among the processes of a torchrun job (factorkit.parallel): the assignment, and a 2-process
gloo compression that saves the same tensors as one process."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from factorkit.cli import main
from factorkit.parallel import Team

from conftest import free_port


def test_problems_go_largest_first_to_the_least_loaded_process():
    costs = [5.0, 3.0, 3.0, 1.0, 4.0]
    owners = Team(rank=1, world=2).owners(costs)
    assert owners == [0, 1, 0, 1, 1]  # 5 -> 0, 4 -> 1, 3 -> 1 (4 < 5), 3 -> 0 (5 < 7), 1 -> 1 (7 < 8)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(loads) - min(loads) <= max(costs)  # never further apart than one problem
    assert Team().owners(costs) == [0] * 5
    assert Team(0, 3).owners([1.0, 1.0, 1.0]) == [0, 1, 2]


def _worker(rank: int, world: int, port: int, argv: list[str], cache: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "FACTORKIT_CACHE": cache})
    torch.set_num_threads(1)
    assert main(argv) == 0


def test_two_processes_save_the_tensors_of_one(model_dir, text_file, tmp_path, capsys):
    args = ["-q", "compress", "--model", str(model_dir), "--method", "cospadi", "--ratio", "0.3", "--iterations", "3",
            "--calib", str(text_file), "--calib-samples", "6", "--calib-seq-len", "32"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes: the same arithmetic
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, free_port(), [*args, "--out", str(tmp_path / "two")],
                            os.environ.get("FACTORKIT_CACHE", str(tmp_path / "cache"))), nprocs=2)
    one, two = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys() and any(k.endswith(".support") for k in one)
    for key in one:
        assert torch.equal(one[key], two[key]), key
