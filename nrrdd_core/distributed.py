"""Runs over several processes with ``torch.distributed`` (``torchrun``), METHODS.md §7.

::

    torchrun --nproc_per_node 2 -m nrrdd_core.cli distill --method rded --dataset shapes ...

``torchrun`` starts one process per rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the
rendezvous address); :func:`from_env` joins the process group (``nccl`` when the rank has a GPU,
``gloo`` on CPU) and picks the rank's device (``cuda:LOCAL_RANK``, else the CPU). Without these
variables everything runs in one process, unchanged.

What is sharded (:func:`DistContext.run`):

- RDED and NRR-DD's CIDD (the per-class selection of real patches,
  :class:`~nrrdd_core.methods.common.PatchSelectionDistiller`): class position ``p`` (in the
  run's class order) is selected by rank ``p mod world``. Every class draws its real images and
  candidate boxes from its own generator seeded from ``(seed, class)``
  (:func:`nrrdd_core.device.class_generator`), so each class's images are the same whichever
  rank selects it, and the same as in a one-process run. When every rank has selected its
  classes, the stitched images are all-gathered; rank 0 then runs what follows (NRR-DD's
  refinement, which optimises all images jointly) and writes the one run; the other ranks exit.
- EDF's expert trajectories (:meth:`DistContext.train_experts`, ``nrrdd experts`` and ``nrrdd
  distill --method edf`` without a buffer): expert ``i`` is trained by rank ``i mod world`` (each
  expert depends only on ``(seed, i)``, so the buffer equals the one-process buffer); rank 0 writes
  the manifest once all are there. The matching itself then runs on rank 0.
- Student evaluation (``nrrdd evaluate`` under ``torchrun``, KD protocol): the student is wrapped
  in ``DistributedDataParallel`` (:func:`data_parallel`); every rank draws the same batches (same
  seed) and trains on its share of each (samples ``rank, rank + world, ...``), gradients are
  averaged over the ranks; BN layers are synchronised on CUDA (``SyncBatchNorm``), per rank on the
  CPU. Rank 0 writes the result.
- Methods without a per-class phase (SRe2L, EDF's matching) run whole on rank 0; the other ranks
  exit at once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .device import resolve_device

log = logging.getLogger(__name__)


def env_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the ``torchrun`` environment; ``(0, 1, 0)`` outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def owned_positions(num: int, rank: int, world: int) -> list[int]:
    """Class positions ``0..num-1`` handled by ``rank``: those with ``p mod world == rank``."""
    return list(range(rank, num, world))


@dataclass
class DistContext:
    """This process's place in a distributed run.

    Attributes:
        rank, world, local_rank: from :func:`env_ranks`.
        device: the device this rank computes on.
        backend: ``"nccl"``, ``"gloo"`` or ``""`` (one process).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def writes(self) -> bool:
        """True on the rank that writes the run (rank 0)."""
        return self.rank == 0

    # ---- collectives ----------------------------------------------------------------------------
    def gather_classes(self, x: torch.Tensor, ipc: int) -> torch.Tensor:
        """All-gather images ordered class by class: ``x`` ``(K*ipc, ...)`` holds valid images for
        this rank's class positions (:func:`owned_positions`); the result holds every rank's.

        Returns:
            a new tensor shaped like ``x`` with each class slice taken from the rank that owns it.
        """
        import torch.distributed as dist

        k = len(x) // ipc
        per = -(-k // self.world)
        mine = owned_positions(k, self.rank, self.world)
        buf = x.new_zeros(per * ipc, *x.shape[1:])
        for i, p in enumerate(mine):
            buf[i * ipc:(i + 1) * ipc] = x[p * ipc:(p + 1) * ipc]
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        out = x.clone()
        for r in range(self.world):
            for i, p in enumerate(owned_positions(k, r, self.world)):
                out[p * ipc:(p + 1) * ipc] = parts[r][i * ipc:(i + 1) * ipc]
        return out

    # ---- running a distiller --------------------------------------------------------------------
    def run(self, d, callback: Callable | None = None, should_stop: Callable[[], bool] | None = None
            ) -> bool:
        """Run the distiller ``d`` (built with this rank's device) as described in the module
        docstring; returns True on the rank that must write the run.

        With one process this is :func:`~nrrdd_core.methods.base.run_distiller`.
        """
        from .methods.base import run_distiller
        from .methods.common import PatchSelectionDistiller

        if self.world == 1:
            run_distiller(d, callback, should_stop)
            return True
        if not isinstance(d, PatchSelectionDistiller):
            if self.writes:
                log.warning("%s has no per-class phase to shard: rank 0 runs it whole", d.name)
                run_distiller(d, callback, should_stop)
            return self.writes
        d.shard(self.rank, self.world, lambda x: self.gather_classes(x, d.ipc))
        if self.writes:
            run_distiller(d, callback, should_stop)
            return True
        while d.step_index < d.select_steps:
            rec = d.step()
            if callback is not None:
                callback(rec)
        if d.select_steps == 0:  # more ranks than classes: still take part in the gather
            d.x0 = self.gather_classes(d.x0, d.ipc)
        return False

    def train_experts(self, cfg, bundle, device: str | torch.device | None = None,
                      progress: Callable | None = None):
        """Train the expert buffer of ``cfg`` on ``bundle`` with expert ``i`` on rank
        ``i mod world`` (cached experts are reused); returns the buffer folder on every rank.

        With one process this is :func:`nrrdd_core.experts.train_experts`.
        """
        import torch.distributed as dist

        from .experts import MANIFEST, ExpertTrainer, buffer_dir, train_experts

        device = device or self.device
        if self.world == 1 or (buffer_dir(cfg, bundle) / MANIFEST).is_file():
            return train_experts(cfg, bundle, device=device, progress=progress)
        trainer = ExpertTrainer(cfg, bundle, device)
        mine = owned_positions(cfg.num_experts, self.rank, self.world)
        for n, i in enumerate(mine):
            if trainer._reusable(i):
                continue
            trainer.expert = i
            trainer._start_expert(reuse=False)
            while trainer.expert == i:
                info = trainer.step()
                if progress is not None:
                    progress(n * cfg.epochs + info["epoch"], len(mine) * cfg.epochs, info)
        dist.barrier()
        if self.writes:
            path = ExpertTrainer(cfg, bundle, device).finish()  # every expert file is reused
        dist.barrier()
        return path if self.writes else buffer_dir(cfg, bundle)

    def close(self) -> None:
        """Leave the process group (safe to call twice)."""
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def data_parallel(model: torch.nn.Module, device: torch.device):
    """``(model to train, part)`` for a training loop: outside a process group ``(model, identity)``;
    inside one, ``model`` wrapped in ``DistributedDataParallel`` (BN layers converted to
    ``SyncBatchNorm`` on CUDA; ``model`` itself keeps the trained weights, for evaluation) and
    ``part(batch)`` = this rank's samples ``rank::world`` of a
    :class:`~nrrdd_core.labels.MixedBatch` (the whole batch when it has fewer samples than ranks).
    """
    import dataclasses

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model, lambda batch: batch
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info("student trained with DistributedDataParallel on %d ranks", world)
    if device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped = DistributedDataParallel(model, device_ids=[device.index or 0])
    else:
        wrapped = DistributedDataParallel(model)

    def part(batch):
        if len(batch.y) < world:
            return batch
        sl = slice(rank, None, world)
        return dataclasses.replace(batch, x_mix01=batch.x_mix01[sl], y=batch.y[sl],
                                   y_perm=batch.y_perm[sl],
                                   values=None if batch.values is None else batch.values[sl])

    return wrapped, part


def from_env(device: str | torch.device = "auto") -> DistContext:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (else a one-process context on
    ``resolve_device(device)``).

    The rank's device: ``cuda:LOCAL_RANK`` when ``device`` is ``auto`` or ``cuda`` and CUDA is
    available (backend ``nccl``), else the CPU (backend ``gloo``).

    Raises:
        ConfigError: a device that does not exist here (from :func:`resolve_device`).
    """
    import torch.distributed as dist

    rank, world, local = env_ranks()
    dev = resolve_device(device)
    if world == 1:
        return DistContext(device=dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    log.info("rank %d of %d on %s (%s)", rank, world, dev, backend)
    return DistContext(rank, world, local, dev, backend)
