"""Calibration under torch.distributed: every rank ends with the statistics of all ranks' data."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from zoo import batches, build

import se_surgery as se


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
