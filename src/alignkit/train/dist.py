"""Several processes on one run (SPEC §12): `accelerate launch [--config_file …] -m alignkit COMMAND …`.

Accelerate (or torchrun) starts the processes and sets RANK/WORLD_SIZE; `Processes.start()` joins them into one
process group through Accelerate's `PartialState` (gloo on CPU, NCCL on GPUs). The run then stays exact:

- `batch_size` is per process: micro-batch k of the run is the k-th batch of `batch_size × processes` examples
  in the seeded data order, and process r trains on its r-th slice;
- the loss units (tokens or examples) of a step are summed over processes before the losses are normalised, and
  the gradients are summed after the backward passes, so N processes with batch b make the update of one
  process with batch N·b (up to the order of float additions);
- metrics are summed the same way; only the main process writes (config, logs, checkpoints, final/).

One process (no launcher) is `Processes()` with size 1: every call here is then a no-op.
"""

from __future__ import annotations

import os

import torch


def launched_size() -> int:
    """Processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    world = os.environ.get("WORLD_SIZE", "1").strip()
    return int(world) if world.isdigit() and int(world) > 0 else 1


class Processes:
    """This process's place among the run's processes, and the sums across them."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size
        self.sharded = False  # FSDP2 (`alignkit.train.shard`) reduces the gradients itself

    @classmethod
    def start(cls) -> Processes:
        """Join the launcher's processes (a no-op for one)."""
        if launched_size() == 1:
            return cls()
        from accelerate import PartialState

        # on a machine without CUDA, say so: Accelerate then joins the processes over gloo (MULTI_CPU)
        state = PartialState(cpu=not torch.cuda.is_available())
        if state.num_processes != launched_size() or not torch.distributed.is_initialized():
            raise RuntimeError(f"the launcher started {launched_size()} processes but Accelerate joined "
                               f"{state.num_processes} ({state.distributed_type})")
        return cls(state.process_index, state.num_processes)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of `values` over the processes (float64)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed element-wise over the processes (in place; returned)."""
        if self.size > 1:
            torch.distributed.all_reduce(t)
        return t

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over the processes, in one flat buffer (a parameter without a gradient counts 0); under
        FSDP2 the sharded models' reduce-scatter has summed them already."""
        if self.size == 1 or not params or self.sharded:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def end(self) -> None:
        """Leave the process group (after a last barrier): a process that exits with the group still up can abort
        in its teardown ("terminate called without an active exception")."""
        if self.size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (e.g. a signal that reached one process)."""
        return self.sum([float(flag)])[0] > 0 if self.size > 1 else flag

    def shard(self, indices: list[int]) -> list[int]:
        """This process's contiguous slice of a batch of `batch_size × size` indices (possibly empty at the
        end of an epoch)."""
        if self.size == 1:
            return indices
        per = -(-len(indices) // self.size)  # ceil
        return indices[self.rank * per:(self.rank + 1) * per]

    def span(self, n: int) -> tuple[int, int]:
        """(start, stop) of this process's contiguous share of n items, shares differing by at most one (ppo's
        prompts, evaluation chunks: every process gets one whenever n ≥ processes)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def gather(self, obj) -> list:
        """Every process's `obj` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_names(self, names: list[str]) -> list[list[str]]:
        """Every process's list of names (e.g. of the metrics a step produced, which may differ by process)."""
        return self.gather(names)


ONE = Processes()  # a run without a launcher
