"""Data-parallel training on CPU: 2 processes, the gloo backend, addresses on 127.0.0.1 only.

DDP must average the ranks' gradients: two ranks that each draw their own half batch end with
the SAME weights as one process that sees both halves at once (and as each other), and only
rank 0 writes the checkpoint.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from fewstep_lab.distributed import DistInfo, init_distributed, rank_batch_size
from fewstep_lab.train import read_checkpoint_meta, step_generator, train

STEPS, HALF, SEED = 8, 4, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 3))


def _half_batch(g):
    return torch.randn(HALF, 6, generator=g)  # inputs and noisy targets: gradients change sign


def _loss(m, xy, ctx):
    return ((m(xy[:, :3]) - xy[:, 3:]) ** 2).mean(1)


def _worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    assert info.backend == "gloo" and info.world_size == world and info.rank == rank
    torch.manual_seed(100 + rank)  # different initial weights: DDP must broadcast rank 0's
    model = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 3))
    if rank == 0:
        model.load_state_dict(_model().state_dict())
    state = train(model, _loss, _half_batch, steps=STEPS, lr=1e-2, seed=SEED, device="cpu", progress=False,
                  ema_decays={"ema": 0.5}, checkpoint_path=os.path.join(folder, "run.pt"), log_every=1,
                  distributed=True)
    torch.save({"model": model.state_dict(), "ema": state.emas["ema"].state_dict(), "losses": state.losses},
               os.path.join(folder, f"rank{rank}.out"))
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_match_one_process_on_the_joint_batch(tmp_path):
    # fork: the children inherit the imported torch instead of importing it again (seconds each).
    torch.multiprocessing.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                                          start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.out", weights_only=True) for r in (0, 1))
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k
    assert r0["losses"] == r1["losses"]  # the logged loss is the mean over ranks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.out", "rank1.out", "run.pt"]
    assert read_checkpoint_meta(tmp_path / "run.pt")["step"] == STEPS

    # One process on the union of both ranks' batches: same mean loss, so the same gradients.
    step = [0]

    def joint_batch(g):
        k = step[0]
        step[0] += 1
        return torch.cat([_half_batch(step_generator(SEED, k, rank=r)) for r in (0, 1)])

    single = _model()
    train(single, _loss, joint_batch, steps=STEPS, lr=1e-2, seed=SEED, device="cpu", progress=False)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["model"][k], v, rtol=1e-5, atol=1e-6)
    # ... and that is not what rank 0 alone would have done: rank 1's data counted.
    alone = _model()
    train(alone, _loss, _half_batch, steps=STEPS, lr=1e-2, seed=SEED, device="cpu", progress=False)
    diff = max((a - b).abs().max().item() for a, b in zip(alone.parameters(), single.parameters()))
    assert diff > 1e-5, diff


def test_single_process_and_errors(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == DistInfo(0, 1, 0, torch.device("cpu"), None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed("cpu")
    assert rank_batch_size(512, 4) == 128
    with pytest.raises(ValueError, match="multiple of 3"):
        rank_batch_size(512, 3)
    with pytest.raises(RuntimeError, match="process group"):
        train(_model(), _loss, _half_batch, steps=1, device="cpu", progress=False, distributed=True)


def test_torchrun_cifar_train_writes_one_checkpoint(tmp_path):
    out = tmp_path / "edm.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "fewstep_lab", "train",
           "--method", "edm", "--data", "cifar10", "--profile", "smoke", "--steps", "3", "--out", str(out), "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)) for 3 steps" in done.stdout
    assert done.stdout.count("trained edm") == 1  # rank 0 alone reports
    assert [p.name for p in tmp_path.iterdir()] == ["edm.pt"]
    assert read_checkpoint_meta(out)["step"] == 3
