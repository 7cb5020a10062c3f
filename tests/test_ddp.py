"""DDP over 2 CPU processes (gloo) equals one process on the whole batch; only the sparse values
are all-reduced."""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TinyNet
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sara_train

STEPS = 3


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 5, 5, generator=generator), torch.randn(6, 4, generator=generator)


def train(model: nn.Module, params, batch) -> None:
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    x, y = batch
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def ddp_worker(rank: int, world: int, out_dir: str) -> None:
    # A file rendezvous: no TCP port to pick (a port chosen free can be taken before the workers bind it).
    store = Path(out_dir) / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinyNet()
    handle = sara_train.inject(model, sara_train.SaRAConfig(budget=0.1))
    ddp = DistributedDataParallel(model)
    reduced: list[int] = []

    def counting_allreduce(state, bucket):
        reduced.append(bucket.buffer().numel())
        tensor = bucket.buffer().div_(world)
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    ddp.register_comm_hook(None, counting_allreduce)
    x, y = make_batch()
    train(ddp, handle.parameters(), (x.chunk(world)[rank], y.chunk(world)[rank]))
    if rank == 0:
        save_file(
            {name: v.detach() for name, v in handle.named_parameters()},
            str(Path(out_dir) / "ddp.safetensors"),
            metadata={"reduced_per_step": str(sum(reduced) // STEPS), "trainable": str(handle.num_trainable)},
        )
    dist.destroy_process_group()


def test_ddp_equals_single_process(tmp_path: Path) -> None:
    mp.spawn(ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    with safe_open(str(tmp_path / "ddp.safetensors"), "pt") as file:
        metadata = file.metadata()
        ddp_values = {name: file.get_tensor(name) for name in file.keys()}
    assert int(metadata["reduced_per_step"]) == int(metadata["trainable"])  # nothing but the sparse values

    torch.manual_seed(0)
    model = TinyNet()
    handle = sara_train.inject(model, sara_train.SaRAConfig(budget=0.1))
    train(model, handle.parameters(), make_batch())
    for name, values in handle.named_parameters():
        torch.testing.assert_close(ddp_values[name], values.detach(), rtol=1e-5, atol=1e-6)
