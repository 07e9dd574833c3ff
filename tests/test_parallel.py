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


@pytest.mark.parametrize("method", [
    # dictionaries shared out per projection
    ["--method", "cospadi", "--ratio", "0.3", "--iterations", "3"],
    # the Fisher pass's sequences shared out (9 over 2 processes: the last round has one), then the chosen
    # dictionaries and ranks; tiny menus down to rank 1 so that both types are picked
    ["--method", "auto", "--ratio", "0.3", "--iterations", "2", "--rank-options", "4", "--max-removal", "1"],
])
def test_two_processes_save_the_tensors_of_one(model_dir, text_file, tmp_path, method):
    args = ["-q", "compress", "--model", str(model_dir), *method,
            "--calib", str(text_file), "--calib-samples", "9" if "auto" in method else "6", "--calib-seq-len", "32"]
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
    if "auto" in method:  # a mixed model: some matrices low rank, some dictionaries
        assert any(k.endswith(".U") or k.endswith(".V") for k in one), sorted(one)
    for key in one:
        assert torch.equal(one[key], two[key]), key


def _statistics(model_dir: str) -> dict:
    """The Fisher sums and the calibration statistics (Grams, |x| sums, unit-length Grams, tokens) of every
    Linear of the tiny model on 7 sequences in batches of 2 (4 batches, the last of one sequence)."""
    from transformers import AutoModelForCausalLM

    from factorkit.calibration import calibrate_blockwise, collect_fisher

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = torch.randint(0, model.config.vocab_size, (7, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, s in collect_fisher(model, data, batch_size=2, progress=False).items():
        out.update({f"{name}.rows": s.rows, f"{name}.cols": s.cols, f"{name}.deletion": torch.tensor([s.deletion]),
                    f"{name}.samples": torch.tensor([s.samples])})

    def on_block(index, block_name, block, stats):
        for name, s in stats.items():
            out.update({f"{block_name}.{name}.gram": s.gram, f"{block_name}.{name}.abs_sum": s.abs_sum,
                        f"{block_name}.{name}.unit_gram": s.unit_gram,
                        f"{block_name}.{name}.tokens": torch.tensor([s.tokens])})

    calibrate_blockwise(model, data, on_block, batch_size=2, progress=False, stats=("gram", "abs_mean", "unit_gram"))
    return out


def _statistics_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    from safetensors.torch import save_file

    from factorkit import parallel

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    stats = _statistics(model_dir)
    if rank == world - 1:  # a process that received most batches' sums from the others
        save_file(stats, out)
    parallel.leave()


def test_batches_shared_by_processes_give_the_one_process_statistics(model_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _statistics(str(model_dir))
    finally:
        torch.set_num_threads(threads)
    # 4 batches over 3 processes: rounds of 3 and of 1
    mp.spawn(_statistics_worker, args=(3, free_port(), str(model_dir), str(tmp_path / "three.safetensors")),
             nprocs=3)
    three = load_file(tmp_path / "three.safetensors")
    assert one.keys() == three.keys() and any(k.endswith(".gram") for k in one)
    assert float(one[next(k for k in one if k.endswith(".deletion"))]) > 0
    assert all(int(one[k]) == 7 * 16 for k in one if k.endswith(".tokens"))  # every batch counted once
    for key in one:
        assert torch.equal(one[key], three[key]), key


def _failing_worker(rank: int, world: int, port: int, out: str, user: bool) -> None:
    """Rank 1 fails in its share of the solves; every rank records how its call ended."""
    import datetime
    import json
    import time

    import torch.distributed as tdist

    from factorkit import parallel
    from factorkit.errors import FactorkitError

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    # a short timeout: without the relay the other ranks would wait in a broadcast until it ran out
    tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    team = parallel.current()

    def solve(problem: int) -> list[torch.Tensor]:
        if team.rank == 1:
            if user:
                raise FactorkitError("the calibration loss is not finite; lower the learning rate.")
            raise MemoryError("cannot allocate 12 GiB")
        return [torch.full((2,), float(problem))]

    outcome = "returned"
    start = time.monotonic()
    try:
        team.solve([0, 1, 2, 3], [1.0, 1.0, 1.0, 1.0], solve)
    except Exception as error:  # noqa: BLE001 - recorded for the test to check
        outcome = f"{type(error).__name__}: {error}"
    with open(f"{out}.{rank}", "w") as f:
        json.dump([outcome, time.monotonic() - start], f)
    parallel.leave(failed=outcome != "returned")


@pytest.mark.parametrize("user", [False, True])
def test_a_failure_in_one_process_stops_every_process_with_its_message(tmp_path, user):
    import json

    mp.spawn(_failing_worker, args=(3, free_port(), str(tmp_path / "outcome"), user), nprocs=3)
    outcomes, seconds = zip(*(json.loads((tmp_path / f"outcome.{r}").read_text()) for r in range(3)))
    assert max(seconds) < 30  # at once, not after the 120 s timeout the others would wait for without the relay
    if user:  # the user's error stays one: every process raises the same sentence, exit status 2 on the CLI
        assert outcomes[1] == "FactorkitError: the calibration loss is not finite; lower the learning rate."
        for r in (0, 2):
            assert outcomes[r] == ("FactorkitError: process 1 of 3: the calibration loss is not finite; "
                                   "lower the learning rate."), outcomes[r]
    else:
        assert outcomes[1] == "MemoryError: cannot allocate 12 GiB"
        for r in (0, 2):
            assert outcomes[r].startswith("PeerFailed: process 1 of 3 failed") and \
                outcomes[r].endswith("MemoryError: cannot allocate 12 GiB"), outcomes[r]
