"""Multi-node rendezvous on one machine: 2 "nodes" x 1 rank started by two `torchrun --nnodes 2` agents
meeting at a c10d rendezvous endpoint on localhost train exactly what 1 node x 2 ranks trains.

What differs between the two launches is what a real multi-node job changes: LOCAL_RANK is 0 on both
ranks, LOCAL_WORLD_SIZE is 1, and the process group is formed through torchrun's rendezvous instead of
a fixed MASTER_ADDR/PORT. Neither may move the data order or the losses.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tb_core.launcher import child_env
from tb_train.dist import free_port

from fixtures.engine import REPO, TrainSetup

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def losses(run: Path) -> dict[int, float]:
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return {e.step: e.value for e in ea.Scalars("loss")}


def test_two_nodes_by_torchrun_rendezvous_equal_one_node_two_ranks(train_setup: TrainSetup, tmp_path):
    run, port = train_setup.root / "two_nodes", free_port()
    env = child_env()  # torchrun chooses the ranks
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "tb2n",
                                "--max_restarts", "0", "-m", "tb_train.train", *train_setup.argv("two_nodes"),
                                "run.max_steps=4", "metrics.image_every=0"],
                               env=env, cwd=REPO, stdout=open(tmp_path / f"node{n}.log", "w"), stderr=subprocess.STDOUT)
              for n in range(2)]
    codes = [a.wait(timeout=600) for a in agents]
    logs = "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in range(2))
    assert codes == [0, 0], logs
    got, reference = losses(run), losses(train_setup.reference)
    assert sorted(got) == [1, 2, 3, 4]
    for step, value in got.items():
        assert value == pytest.approx(reference[step], rel=1e-6, abs=0), (step, value, reference[step])
