"""Calibration under torch.distributed: every rank ends with the statistics of all ranks' data."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from zoo import batches, build

import se_surgery as se

pytestmark = pytest.mark.slow  # subprocesses and zoo models: not in the fast tier


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        data = batches("smp_DeepLabV3Plus", n=4)[rank::world]  # each rank sees its own half
        eq = se.equalize(build("smp_DeepLabV3Plus"), (torch.randn(2, 3, 128, 128),), data, progress=False)
        torch.save({e.site.name: (e.mean.clone(), e.std.clone()) for e in se.equalizers(eq)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree_with_one_process_on_all_data(tmp_path):
    out = str(tmp_path / "stats")
    mp.spawn(_rank, args=(2, _free_port(), out), nprocs=2, join=True)
    single = se.equalize(build("smp_DeepLabV3Plus"), (torch.randn(2, 3, 128, 128),),
                         batches("smp_DeepLabV3Plus", n=4), progress=False)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert ranks[0].keys() == {e.site.name for e in se.equalizers(single)} and len(ranks[0]) == 2
    for e in se.equalizers(single):
        (m0, s0), (m1, s1) = ranks[0][e.site.name], ranks[1][e.site.name]
        assert torch.equal(m0, m1) and torch.equal(s0, s1)  # every rank holds the same statistics
        torch.testing.assert_close(m0, e.mean, rtol=1e-5, atol=1e-6)  # ...those of all the data
        torch.testing.assert_close(s0, e.std, rtol=1e-5, atol=1e-6)


TORCHRUN = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from zoo import build
import se_surgery as se
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
images, labels = torch.randn(4, 3, 128, 128, generator=gen), torch.randint(0, 5, (4, 128, 128), generator=gen)
loader = DataLoader(TensorDataset(images, labels), batch_size=2)
eq = se.equalize(build("smp_UPerNet"), (images[:2],), loader, progress=False)  # (image, label) pairs, 4 levels
model = DDP(eq.train())
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for x, y in loader:
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
keep = {{n for n, _ in eq.named_parameters()}}  # BatchNorm running statistics stay per rank without SyncBatchNorm
torch.save({{k: v for k, v in eq.state_dict().items() if k in keep or k.startswith("scale_equalizers.")}},
           os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
dist.destroy_process_group()
"""


def test_torchrun_two_ranks_calibrate_and_fine_tune_with_ddp(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text(TORCHRUN.format(tests=str(Path(__file__).parent)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert a.keys() == b.keys() and sum(k.endswith(".std") for k in a) == 9
    for key in a:  # statistics of both ranks' data, and the same weights after DDP steps
        assert torch.equal(a[key], b[key]), key
    assert any(k.endswith(".std") and a[k].item() != 1 for k in a)
