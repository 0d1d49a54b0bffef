"""Several processes (Hugging Face Accelerate): every Accelerate call of shrink is in this module.

`accelerate launch --multi_gpu --num_processes N -m shrink.cli prune ...` starts N copies of the whole
run through torchrun: one per GPU (NCCL), or CPU processes over gloo with `--device cpu` or on a host
without GPUs; `accelerate launch --cpu --num_processes N --mpirun_hostfile FILE` starts N CPU processes
through mpirun (gloo too; without the hostfile Accelerate starts one, which check_launch refuses);
several hosts with Accelerate's config. Each copy loads the same model, teacher and data. Then:

    training (shrink.train.loop.train)   data parallel: each process takes its contiguous slice of the
                                         rows of every global batch (the global batch, the batch order
                                         and the step count are those of one process); the student is
                                         wrapped in DDP (gradients averaged during backward), the
                                         parameters outside it (L0 gates, Lagrange multipliers, learned
                                         scores: what extra optimizers or `params` hold) have their
                                         gradients averaged here; each slice's loss is weighted by its
                                         share of the rows, so the average is the one-process gradient
    the teacher                          frozen and replicated, never wrapped; it scores each process's
                                         own rows, or the whole global batch when a loss compares rows
                                         with each other (the relational embedding loss' bank)
    randomness                           dropout draws from a per-process seed (seed + rank); the hooks
                                         that sample the model's structure (L0 gates, layer and head
                                         drops: Hooks.before_step) draw from one stream shared by all
                                         processes, so every process trains the same sampled model
    everything else                      scores, searches, latency tables, evaluations, exports,
                                         benchmarks and writing: once, on the main process (on_main),
                                         the others waiting and receiving its result

A one-process run never imports accelerate (current() is None without WORLD_SIZE > 1).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, nullcontext

import torch

from shrink.console import state as console_state

_CURRENT: Distributed | None = None
_SOLO = 0  # > 0 while the main process runs something alone (on_main): then it is a one-process run


# where a launcher says how many processes there are: torchrun (WORLD_SIZE), Intel MPI / MPICH, Open MPI,
# MVAPICH (what `accelerate launch --cpu --mpirun_hostfile` runs); Accelerate reads the same ones
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def world_size() -> int:
    for name in _WORLD_SIZE_VARIABLES:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return 1


def launched() -> bool:
    """Whether this process is one of several (torchrun, or mpirun under accelerate launch --cpu)."""
    return world_size() > 1


def check_launch() -> None:
    """One clear error for the launch that silently runs alone: `accelerate launch --cpu --num_processes
    N` without `--mpirun_hostfile` starts ONE process (it still sets MASTER_ADDR for the N it meant)."""
    from shrink.errors import BadInputError

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ and not launched():
        raise BadInputError(
            "accelerate launch --cpu with several processes started only one (its --cpu path runs them through mpirun)",
            hint="add --mpirun_hostfile FILE (Open MPI or Intel MPI installed), or use --multi_gpu, which starts "
            "gloo processes on a host without GPUs",
        )


def current(device: str | None = None) -> Distributed | None:
    """This process's Distributed, made on first use (which joins the process group); None in a
    one-process run, and inside on_main(). `device`: "cpu" forces gloo even on a host with GPUs."""
    global _CURRENT
    if _SOLO:
        return None
    if _CURRENT is None and launched():
        _CURRENT = Distributed(cpu=(device or "cpu") == "cpu" or not torch.cuda.is_available())
    return _CURRENT


def is_main() -> bool:
    """True in a one-process run and on the main process of several."""
    dist = current()
    return dist is None or dist.is_main


def on_main(fn: Callable[[], object]) -> object:
    """fn() run once on the main process, its result (picklable) handed to every process; the others
    wait. Inside fn the main process is on its own: a train() there (a scoring method's recovery
    steps) trains in one process. In a one-process run, fn()."""
    global _SOLO
    dist = current()
    if dist is None:
        return fn()
    value = None
    if dist.is_main:
        _SOLO += 1
        try:
            value = fn()
        finally:
            _SOLO -= 1
    return dist.broadcast(value)


def wait() -> None:
    """A barrier: every process waits here for the others (no-op in one process)."""
    dist = current()
    if dist is not None:
        dist.accelerator.wait_for_everyone()


class Distributed:
    """This process among the others: rank, world size, its device, and the collective operations."""

    def __init__(self, cpu: bool):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # find_unused_parameters: parts of a model take no part in a loss (a base model's pooler under an
        # embedding loss)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.accelerator = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = "cpu" if cpu else str(self.accelerator.device)  # cuda:<local rank>
        if not self.is_main:  # one voice: the main process's notes and progress
            console_state["quiet"] = True

    # --- data --------------------------------------------------------------------------------------

    def rows(self, batch: dict) -> int:
        return _rows(batch)

    def bounds(self, rows: int) -> tuple[int, int]:
        """This process's contiguous slice of `rows` (sizes differ by at most one), in rank order, so
        the slices put together are the global batch in its order."""
        return rows * self.rank // self.world, rows * (self.rank + 1) // self.world

    def shard(self, value, rows: int):
        """`value` (a batch, or teacher targets of the global batch) cut to this process's rows: every
        tensor whose first dimension is the batch's, in dicts, lists and tuples; anything else kept
        whole (TeacherBank: all rows of the batch). A process with no row (a batch smaller than the
        world) gets row 0, which its weight 0 takes out of the gradient."""
        start, end = self.bounds(rows)
        if start == end:
            start, end = 0, 1
        return _slice(value, rows, start, end)

    def weight(self, rows: int) -> float:
        """What this process's mean loss is multiplied by so that DDP's average of the gradients is the
        gradient of the global batch's mean: its share of the rows times the world size."""
        start, end = self.bounds(rows)
        return (end - start) * self.world / rows

    # --- the model ---------------------------------------------------------------------------------

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module in DDP (its gradients averaged during backward); the module itself when nothing in
        it trains (DDP refuses that: only the parameters outside it, all-reduced by sync, learn)."""
        if not any(p.requires_grad for p in module.parameters()):
            return module
        return self.accelerator.prepare_model(module, device_placement=False)

    def release(self) -> None:
        """Drop Accelerate's references to the wrapped modules (a pipeline trains several times)."""
        self.accelerator.free_memory()

    def no_sync(self, wrapped: torch.nn.Module, skip: bool):
        """DDP's no_sync while accumulating micro-batches (skip=True): gradients reduced once a step."""
        if not skip or not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            return nullcontext()
        return self.accelerator.no_sync(wrapped)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average these parameters' gradients over the processes (one all-reduce for all of them).
        Every process runs the same graph, so the same parameters have gradients everywhere."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        # on this process's device: NCCL reduces GPU tensors only, and l0's gates live on the CPU
        flat = torch.cat([p.grad.detach().reshape(-1).float().to(self.device) for p in params])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad).to(p.grad.dtype))
            offset += n

    # --- values ------------------------------------------------------------------------------------

    def sum(self, value: float) -> float:
        """The sum of a number over the processes."""
        total = self.accelerator.reduce(torch.tensor([float(value)], dtype=torch.float64, device=self.device), reduction="sum")
        return float(total.item())

    def broadcast(self, value):
        """The main process's `value` (any picklable object) on every process."""
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """The main process's weights and buffers copied into every process's `module` (same shapes)."""
        from accelerate.utils import broadcast

        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.copy_(broadcast(tensor.detach().clone(), from_process=0))


class LossModule(torch.nn.Module):
    """The objective's loss of the model on a batch as one module's forward, so DDP wraps the student
    (and sees its forward) while the objective still gets the plain model to read its config and
    pooling. The objective (and the teacher it holds) is a plain attribute: never wrapped."""

    def __init__(self, model: torch.nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict, targets: dict) -> torch.Tensor:
        return self.objective(self.model, batch, targets)


def compares_rows(objective) -> bool:
    """Whether a row's loss depends on the other rows of its batch (the relational embedding loss
    compares each student row with the teacher embeddings of the whole batch): then the teacher
    scores the global batch on every process, so the bank and its queue are those of one process."""
    from shrink.train.objectives import EmbeddingRelation

    parts = getattr(objective, "parts", None)  # a SumObjective, whose parts may be sums themselves (l0's)
    return any(compares_rows(part) for part in parts) if parts is not None else isinstance(objective, EmbeddingRelation)


class SharedRandom:
    """torch's default generators (CPU and the current CUDA device) as they are on every process:
    seeded with the run's seed and advanced only inside active(), while each process's own stream
    (seed + rank) serves everything else (dropout)."""

    def __init__(self, seed: int):
        own = _rng_state()
        torch.manual_seed(seed)
        self.state = _rng_state()
        _set_rng_state(own)

    @contextmanager
    def active(self):
        own = _rng_state()
        _set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = _rng_state()
            _set_rng_state(own)


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _rows(batch) -> int:
    for value in (batch.values() if isinstance(batch, dict) else batch):
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, (dict, list, tuple)):
            found = _rows(value)
            if found:
                return found
    return 0


def _slice(value, rows: int, start: int, end: int):
    if torch.is_tensor(value):
        return value[start:end] if value.dim() > 0 and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {k: _slice(v, rows, start, end) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_slice(v, rows, start, end) for v in value)
    return value


def outside(params: Sequence[torch.nn.Parameter], module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of `params` that are not the module's (DDP does not see them), each once."""
    inside = {id(p) for p in module.parameters()}
    seen, found = set(), []
    for p in params:
        if id(p) not in inside and id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            found.append(p)
    return found
