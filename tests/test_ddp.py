"""DFPConv2d / DFPLinear under DistributedDataParallel: 2 processes, gloo on loopback.

Each rank trains a few SGD steps on its own data shard; DDP all-reduces the DFP16 gradients,
so both ranks must end with bit-identical weights, different from the initial ones. This file
is also the worker script (``python tests/test_ddp.py RANK WORLD PORT OUT``).
"""
import os
import socket
import subprocess
import sys

import torch

STEPS = 4


def _model():
    import dfpgen.runtime as dfp
    torch.manual_seed(0)
    return torch.nn.Sequential(
        dfp.DFPConv2d(1, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        dfp.DFPConv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), dfp.DFPLinear(32, 10))


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    from dfpgen import threads
    threads.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    model = _model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    for _ in range(STEPS):
        x = torch.randn(4, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"init": init, "final": model.state_dict()}, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_end_with_identical_weights(tmp_path):
    port = _free_port()
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(port), str(outs[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    for p in procs:
        try:
            log = p.communicate(timeout=150)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, log[-3000:]
    r0, r1 = (torch.load(o) for o in outs)
    weights = [k for k in r0["final"] if k.endswith("weight")]
    assert len(weights) == 4  # three DFP layers and the BatchNorm
    for k, v in r0["final"].items():
        if k.endswith("num_batches_tracked") or "running_" in k:
            continue  # BatchNorm statistics are per rank (not synchronised without SyncBN)
        assert torch.equal(v, r1["final"][k]), k
        assert not torch.equal(v, r0["init"][k]), f"{k} did not change"


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
