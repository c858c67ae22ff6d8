"""Training on several processes (and machines) with torchrun and DistributedDataParallel.

    torchrun --standalone --nproc_per_node 2 scripts/train.py --config small

torchrun starts one Python process per GPU (or per share of the CPU cores) and tells each who it
is through environment variables: RANK (0 .. WORLD_SIZE-1 over all machines), LOCAL_RANK (its
number on this machine), WORLD_SIZE, LOCAL_WORLD_SIZE, and where to meet (MASTER_ADDR/PORT).
Every process runs the same program on its own share of the data:

    forward and backward on its own micro-batches
    -> DDP all-reduces (averages) the gradients over the processes during backward
    -> every process applies the same update, so the weights stay identical everywhere

Only rank 0 writes anything (console progress, metrics, checkpoints, the final model); the others
compute. Decisions that must be the same everywhere (the step's weight, whether to stop, the
validation loss) are all-reduced, so no process ever waits in a collective the others skipped.

Without torchrun every function here is a cheap no-op for one process (rank 0 of 1), so the rest
of the code never asks "am I distributed?" (the style of nanochat's `common.py`).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import islice
from typing import Any, ContextManager, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger("minigpt.distributed")

T = TypeVar("T")


@dataclass(frozen=True)
class ProcessPlace:
    """Where this process stands among the processes torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1


def process_place() -> ProcessPlace:
    """Read the place from torchrun's environment variables; they are set before Python starts,
    so this works before (and without) the process group."""
    environment = os.environ
    return ProcessPlace(
        rank=int(environment.get("RANK", 0)), local_rank=int(environment.get("LOCAL_RANK", 0)),
        world_size=int(environment.get("WORLD_SIZE", 1)), local_world_size=int(environment.get("LOCAL_WORLD_SIZE", 1)),
    )


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return process_place().rank


def world_size() -> int:
    return process_place().world_size


def is_main_process() -> bool:
    """Rank 0: the one process that prints and writes files."""
    return rank() == 0


def print0(*values: Any) -> None:
    """print() on rank 0 only."""
    if is_main_process():
        print(*values)


def backend_for(device: torch.device, requested: str = "auto") -> str:
    """NCCL moves CUDA tensors GPU to GPU (NVLink, InfiniBand); gloo moves CPU tensors over TCP."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def compute_init(device: torch.device, backend: str = "auto") -> torch.device:
    """Join the process group torchrun prepared and return this process's device.

    Under torchrun each process binds one GPU, the LOCAL_RANK-th of its machine, so that two
    processes never share a GPU. The console hears each event once, from rank 0; the other ranks
    say only what is theirs alone (see `OtherRankLogFilter`). Without torchrun (WORLD_SIZE unset
    or 1) nothing happens and `device` is returned.
    """
    place = process_place()
    if place.world_size == 1 or is_distributed():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", place.local_rank)
        torch.cuda.set_device(device)
    chosen = backend_for(device, backend)
    # device_id binds NCCL's communicator to this GPU at once; gloo has no use for it.
    dist.init_process_group(backend=chosen, device_id=device if chosen == "nccl" else None)
    if place.rank != 0:
        logging.getLogger("minigpt").setLevel(logging.WARNING)
        rank_filter = OtherRankLogFilter(place.rank)
        for handler in logging.getLogger().handlers + logging.getLogger("minigpt").handlers:
            handler.addFilter(rank_filter)
    log.info("Process group: %d processes (%d on this machine), backend %s", place.world_size, place.local_world_size, chosen)
    return device


# `log.warning(..., extra=PER_PROCESS)`: a warning about this process alone (its machine's memory,
# its GPU), which every rank reports for itself; other warnings are the same on every rank.
PER_PROCESS: dict[str, Any] = {"per_process": True}


class OtherRankLogFilter(logging.Filter):
    """The console filter of every process but rank 0.

    Most of what a process logs is the same on every rank: the loss and gradient norm after their
    all-reduce, the validation metrics, a warning about the configuration. Rank 0 says those once.
    This filter lets through only what this process alone can say, errors and warnings marked
    `PER_PROCESS`, each line starting with `[rank R]` so one knows which process (and machine).
    """

    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and not getattr(record, "per_process", False):
            return False
        if not str(record.msg).startswith(self.prefix):  # a record can pass through two handlers
            record.msg = self.prefix + str(record.msg)
        return True


def compute_cleanup() -> None:
    """Leave the process group (after every process has arrived, so none leaves mid-collective)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


# What a collective raises in a process whose peer has gone (failed, or stopped by torchrun):
# gloo's transport says so in the message; NCCL's errors are DistBackendError.
LOST_PEER_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_another_process(error: BaseException) -> bool:
    """Whether `error` is this process finding, in a collective, that another process has gone."""
    if isinstance(error, dist.DistBackendError):
        return True
    return isinstance(error, RuntimeError) and any(message in str(error) for message in LOST_PEER_MESSAGES)


def cores_per_process(available_cores: int) -> int:
    """Split this machine's cores between its processes, so that they do not oversubscribe them
    (two processes each running one thread per core would fight over every core)."""
    return max(1, available_cores // process_place().local_world_size)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (training a tokenizer, building a token cache: work that
    writes a shared file); the others wait, then run it and find the file made."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over every process, in place (and return it)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_over_processes(*values: float, device: torch.device) -> list[float]:
    """Numbers summed over every process, in one small all-reduce, in float64 (exact for integers
    below 2**53). In a single process they are returned as they are: no tensor, so no wait for an
    accelerator on the training step's path."""
    if not is_distributed():
        return list(values)
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def agree_on_stop(reason: str | None, reasons: tuple[str, ...], device: torch.device) -> str | None:
    """The stop reason every process adopts: the most severe (latest in `reasons`) of any process.

    A signal reaches the processes at slightly different moments, a time budget runs out on each
    clock at a slightly different step, and only one machine may run short of memory. If each
    process stopped on its own, the others would wait forever in the next step's all-reduce;
    so every step the processes agree, and all stop after the same step.
    """
    if not is_distributed():
        return reason
    code = torch.tensor(reasons.index(reason) + 1 if reason else 0, device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return reasons[int(code) - 1] if int(code) else None


def gather_to_main(value: T) -> list[T] | None:
    """Every process's `value` (any picklable object), as a list by rank on rank 0; None elsewhere."""
    if not is_distributed():
        return [value]
    gathered: list[T] | None = [None] * dist.get_world_size() if is_main_process() else None  # type: ignore[list-item]
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_main(value: T) -> T:
    """Rank 0's `value` on every process (for a choice that must be identical everywhere)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def this_process_share(items: Iterable[T]) -> Iterator[T]:
    """Items rank, rank + world_size, rank + 2 * world_size, ...: this process's share of a
    sequence every process reads alike (validation batches), so together they cover it once."""
    place = process_place() if is_distributed() else ProcessPlace()
    return islice(items, place.rank, None, place.world_size)


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model DistributedDataParallel-wrapped for training on several processes, else unchanged.

    DDP broadcasts rank 0's weights at once (so every process starts identical) and, during
    backward, all-reduces each bucket of gradients as soon as it is ready, overlapping the
    communication with the rest of the backward pass. Keep the unwrapped model for saving:
    its parameter names carry no `module.` prefix, so a checkpoint loads in one process too.
    """
    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(model: torch.nn.Module, enabled: bool) -> ContextManager:
    """`model.no_sync()` when `enabled` is False: with gradient accumulation only the last
    micro-batch's backward needs the all-reduce; the earlier ones just add to local gradients.

    Put the forward pass inside it too, not only the backward: DDP reads the setting in forward()
    to prepare that pass's backward (a forward outside would all-reduce anyway: the same sums,
    once per micro-batch instead of once per step)."""
    ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    if enabled or not isinstance(ddp, DistributedDataParallel):
        return nullcontext()
    return ddp.no_sync()
