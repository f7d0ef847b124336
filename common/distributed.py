"""Data-parallel training under torchrun: one process per GPU (NCCL), or per CPU share (gloo).

    torchrun --standalone --nproc_per_node=8 train.py ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain `python train.py` is a world of one process
that never touches torch.distributed. train.py wraps the compiled model in DistributedDataParallel
and uses the few collectives below: the step's counted targets and loss summed over the ranks, a
stop signal seen by any rank, and a barrier after the save of a stop. check_world says whether a
checkpoint continues exactly on this many processes, with this --batch-size and --grad-accum
(docs/torchrun.md).
"""
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.settings import Failure, fail, pick_device, rank_prefix


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"
    distributed: bool = False  # launched by torchrun (even with one process)

    @property
    def main(self):  # rank 0 alone writes checkpoints and logs and shows the progress bar
        return self.rank == 0

    def sum(self, value):
        """A number or a one-element tensor, summed over the ranks: a float on every rank."""
        if not self.distributed:
            return float(value)
        total = torch.as_tensor(value, dtype=torch.float64, device=self.device).detach().clone()
        dist.all_reduce(total)
        return total.item()

    def each(self, value):
        """Every rank's number, as a list of floats indexed by rank (one all-reduce)."""
        if not self.distributed:
            return [float(value)]
        values = torch.zeros(self.size, dtype=torch.float64, device=self.device)
        values[self.rank] = value
        dist.all_reduce(values)
        return values.tolist()

    @contextmanager
    def one_voice(self):
        """A stretch of code that may stop (settings.fail) on some ranks only: its data or checkpoint
        missing on one node, its GPU without bfloat16. At its end every rank learns whether any
        stopped, and then all stop. Rank 0 has said its reason; a rank whose reason rank 0 did not
        have says it too, after its rank: an error every rank shares is said once."""
        if not self.distributed:
            yield
            return
        reason = None
        try:
            yield
        except Failure as e:
            reason = e.message
        reasons = [None] * self.size
        dist.all_gather_object(reasons, reason)
        if any(r is not None for r in reasons):
            if reason is not None and reason != reasons[0]:
                print(f"error: {rank_prefix()}{reason}", file=sys.stderr, flush=True)
            self.close()
            sys.exit(2)

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def close(self):
        if self.distributed:
            dist.destroy_process_group()


def start_world(device_name):
    """This process's rank and device. Under torchrun it joins the process group, on the GPU of its
    LOCAL_RANK with NCCL, or on the CPU with gloo."""
    device = pick_device(device_name)
    launch = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ]
    if not launch:
        return World(device=str(device))
    if len(launch) < 3:
        fail(f"the environment sets {', '.join(launch)} but not all of RANK, WORLD_SIZE and LOCAL_RANK; "
             f"launch with torchrun, or unset them to train in one process")
    rank, size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if device.index is not None:
            fail(f"--device {device_name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                 f"pass --device cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES")
        if local_rank >= torch.cuda.device_count():
            fail(f"this node runs {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes but sees "
                 f"{torch.cuda.device_count()} GPUs; lower --nproc-per-node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        fail(f"torchrun trains on CUDA GPUs (NCCL) or on the CPU (gloo), not on {device.type}; "
             f"pass --device cuda or --device cpu")
    return World(rank, size, str(device), distributed=True)


def check_world(checkpoint, config, world, path):
    """A resume, on this or another number of processes, is exact when a step still reads the same
    micro-batches (W x grad_accum of batch_size sequences); otherwise it is refused."""
    saved_world, saved = checkpoint.get("world_size", 1), checkpoint["train_config"]
    micro = saved_world * saved["grad_accum"]
    if (world.size * config.grad_accum, config.batch_size) == (micro, saved["batch_size"]):
        return
    fix = (f"pass --grad-accum {micro // world.size} --batch-size {saved['batch_size']}" if micro % world.size == 0 else
           f"run {saved_world} processes, or a number that divides {micro}")
    fail(f"cannot resume: {path} was trained on {saved_world} process(es) x --grad-accum {saved['grad_accum']} = {micro} "
         f"micro-batches of {saved['batch_size']} per step; {world.size} x {config.grad_accum} of {config.batch_size} "
         f"would read the data in another order. To continue exactly, {fix}")
