"""Processes and the device, decided once at import: rank, world size, device and dtype, and the collectives
the train script uses (a single process skips them all)."""
import os

import torch
import torch.distributed as dist

RANK = int(os.environ.get("RANK", 0))
WORLD = max(int(os.environ.get("WORLD_SIZE", 1)), 1)
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
MAIN = RANK == 0  # only rank 0 logs, writes checkpoints and metrics
# launched by torchrun: a process group even of one process, so `--nproc_per_node 1` runs the collectives too
DISTRIBUTED = WORLD > 1 or "TORCHELASTIC_RUN_ID" in os.environ
DEVICE = torch.device("cuda", LOCAL_RANK) if torch.cuda.is_available() else torch.device("cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # backbone weights and autocast


def set_threads(n):
    """torch's intra-op CPU threads: n, or torch's default (one per core) for 0. A fixed count makes a CPU
    run's numbers the same on any machine and under any load: float sums split over threads add up in another
    order, and the toy's metrics move with the thread count."""
    if n:
        torch.set_num_threads(n)


def init_distributed(backend):
    if not DISTRIBUTED:
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("error: --dist_backend nccl needs CUDA GPUs and none is visible; "
                         "use --dist_backend gloo to run processes on the CPU")
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(backend)


def shard(items):
    """This rank's strided share of a list (all of it in a single process)."""
    return items[RANK::WORLD]


def unshard(local, n):
    """Inverse of shard for a per-item tensor: every rank's values back in global order, exactly once."""
    if not DISTRIBUTED:
        return local
    parts = [None] * WORLD
    dist.all_gather_object(parts, local.cpu())
    full = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        full[r::WORLD] = part
    return full


def all_sum(*values):
    """Sums of python numbers over all ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=DEVICE)
    if DISTRIBUTED:
        dist.all_reduce(t)
    return t.tolist()


def mean_all(t):
    """Mean of a tensor's elements over every rank."""
    t = t.detach().double().reshape(-1)
    s, n = all_sum(float(t.sum()), t.numel())
    return s / max(n, 1)


def barrier():
    if DISTRIBUTED:
        dist.barrier()


def main_first(fn, *args):
    """fn(*args) on rank 0, then on the other ranks: rank 0 builds a cache, the others read it."""
    out = fn(*args) if MAIN else None
    barrier()
    return out if MAIN else fn(*args)


def ddp(module):
    """module wrapped in DistributedDataParallel under torchrun, else module itself."""
    if not DISTRIBUTED:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)
