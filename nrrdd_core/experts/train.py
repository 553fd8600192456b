"""Training the expert trajectories (METHODS.md §5.1): :class:`ExpertTrainer` (one epoch per step,
exact resume) and :func:`train_experts` (cached)."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.base import DatasetBundle, dataset_identity
from ..device import make_generator, resolve_device
from ..dsa import check_strategies, dsa
from ..errors import CheckpointError, ConfigError, StoppedError
from ..io import atomic_torch_save, atomic_write_json, safe_torch_load
from ..models.flat import ParamLayout, seeded_model
from ..models.train import accuracy
from ..zca import zca_for
from .buffer import EXPERT_KIND, MANIFEST, file_sha256, buffer_dir, load_buffer
from .config import ARCH, ExpertConfig

log = logging.getLogger(__name__)

Progress = Callable[[int, int, dict], None]


def _first_per_class(y: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """Indices of the first ``k`` images of every class (all when ``k == 0``), in stored order."""
    if k <= 0:
        return torch.arange(len(y))
    rank = torch.zeros_like(y)
    for c in range(num_classes):
        m = y == c
        rank[m] = torch.arange(int(m.sum()))
    return torch.nonzero(rank < k).flatten()


class ExpertTrainer:
    """Trains the experts of ``cfg`` on ``bundle`` one epoch per :meth:`step` (so that callers
    can show progress and stop), writing each finished expert to the buffer folder and the
    manifest at the end. Experts whose files are already there (an interrupted earlier run;
    each expert depends only on ``(cfg.seed, index)``) are reused.

    Raises:
        ConfigError: invalid config (GSAM, DSA strategies).
    """

    def __init__(self, cfg: ExpertConfig, bundle: DatasetBundle, device: str | torch.device = "auto"):
        self.cfg, self.bundle = cfg, bundle
        self.device = resolve_device(device)
        self.path = buffer_dir(cfg, bundle)
        dc = bundle.config
        self.arch_kwargs = cfg.arch_kwargs(dc.image_size)
        self.strategies = check_strategies(cfg.dsa_strategies.split(","))
        self.zca = zca_for(bundle, cfg.zca_eps) if cfg.zca else None
        self.train_idx = _first_per_class(bundle.train.y, bundle.num_classes, cfg.train_per_class)
        self.x_train = self._prepare(bundle.train.float01(self.train_idx))
        self.y_train = bundle.train.y[self.train_idx]
        self.x_test = self._prepare(bundle.test.float01())
        self.expert = 0
        self.epoch = 0
        self._start_expert()

    def _prepare(self, x01: torch.Tensor) -> torch.Tensor:
        x = self.bundle.config.normalize(x01)
        return self.zca(x) if self.zca is not None else x

    @property
    def total_steps(self) -> int:
        return self.cfg.num_experts * self.cfg.epochs

    @property
    def steps_done(self) -> int:
        return self.expert * self.cfg.epochs + self.epoch

    @property
    def done(self) -> bool:
        return self.expert >= self.cfg.num_experts

    def _file(self, i: int) -> Path:
        return self.path / f"expert_{i:03d}.pt"

    def _start_expert(self, reuse: bool = True) -> None:
        while reuse and not self.done and self._reusable(self.expert):
            self.expert += 1
        if self.done:
            return
        self.epoch = 0
        self.gen = make_generator(self.cfg.seed * 100003 + self.expert)
        self.model = seeded_model(self.bundle.num_classes, self.bundle.config.image_size,
                                  self.arch_kwargs, self.gen).to(self.device)
        self.layout = ParamLayout(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                                   weight_decay=self.cfg.weight_decay)
        self.snapshots = [self.layout.flatten(self.model).cpu()]

    def _reusable(self, i: int) -> bool:
        f = self._file(i)
        if not f.is_file():
            return False
        try:
            obj = safe_torch_load(f)
            return obj.get("kind") == EXPERT_KIND and obj["trajectory"].shape[0] == self.cfg.epochs + 1
        except (CheckpointError, AttributeError, KeyError):
            return False

    def step(self) -> dict:
        """Train the current expert for one epoch; returns ``{"expert", "epoch", "loss",
        ["test_acc"]}`` (loss = mean training CE of the epoch)."""
        if self.done:
            raise RuntimeError("all experts are trained")
        model, gen, n = self.model, self.gen, len(self.x_train)
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for i in range(0, n, self.cfg.batch_size):
            idx = perm[i:i + self.cfg.batch_size]
            xb = self.x_train[idx].to(self.device)
            if self.cfg.dsa:
                xb = dsa(xb, gen, self.strategies)
            loss = F.cross_entropy(model(xb), self.y_train[idx].to(self.device))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        self.snapshots.append(self.layout.flatten(model).cpu())
        self.epoch += 1
        info = {"expert": self.expert, "epoch": self.epoch, "loss": total / max(count, 1)}
        if not math.isfinite(info["loss"]):
            raise ConfigError(f"expert {self.expert} diverged (loss {info['loss']}); lower lr")
        if self.epoch == self.cfg.epochs:
            info["test_acc"] = accuracy(model, self.x_test, self.bundle.test.y)
            atomic_torch_save({"kind": EXPERT_KIND, "trajectory": torch.stack(self.snapshots),
                               "test_acc": info["test_acc"]}, self._file(self.expert))
            log.info("expert %d: test accuracy %.3f", self.expert, info["test_acc"])
            self.expert += 1
            self._start_expert()
        return info

    def state_dict(self) -> dict:
        """The in-progress expert (exact resume mid-expert)."""
        if self.done:
            return {"expert": self.expert}
        return {"expert": self.expert, "epoch": self.epoch, "gen": self.gen.get_state(),
                "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "opt": copy.deepcopy(self.opt.state_dict()), "snapshots": torch.stack(self.snapshots)}

    def load_state_dict(self, s: dict) -> None:
        self.expert = int(s["expert"])
        self._start_expert(reuse="epoch" not in s)
        if "epoch" not in s:
            return
        self.epoch = int(s["epoch"])
        self.gen.set_state(s["gen"])
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.snapshots = list(s["snapshots"].unbind(0))

    def finish(self) -> Path:
        """Write ``zca.pt`` (if any) and the manifest; returns the buffer folder."""
        if not self.done:
            raise RuntimeError("experts not finished")
        cfg, dc = self.cfg, self.bundle.config
        experts, num_params = [], None
        for i in range(cfg.num_experts):
            f = self._file(i)
            obj = safe_torch_load(f)
            num_params = int(obj["trajectory"].shape[1])
            experts.append({"file": f.name, "bytes": f.stat().st_size, "sha256": file_sha256(f),
                            "test_acc": float(obj["test_acc"])})
        manifest = {"kind": EXPERT_KIND, "config": cfg.to_dict(), "arch": ARCH,
                    "arch_kwargs": self.arch_kwargs, "num_classes": self.bundle.num_classes,
                    "image_size": dc.image_size, "num_params": num_params, "epochs": cfg.epochs,
                    "dataset": dataset_identity(self.bundle), "experts": experts}
        if self.zca is not None:
            zf = atomic_torch_save(self.zca.state_dict(), self.path / "zca.pt")
            manifest["zca_file"] = zf.name
            manifest["zca_check"] = {"bytes": zf.stat().st_size, "sha256": file_sha256(zf)}
        atomic_write_json(self.path / MANIFEST, manifest)
        return self.path


def train_experts(cfg: ExpertConfig, bundle: DatasetBundle, device: str | torch.device = "auto",
                  progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Path:
    """Train (or reuse from the cache) the expert buffer of ``cfg`` on ``bundle`` (METHODS.md §5.1).

    Args:
        cfg: expert settings.
        bundle: dataset; its train split trains the experts, its test split gives each expert's
            final accuracy.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        progress: ``progress(done_epochs, total_epochs, info)`` after every epoch.
        should_stop: polled before every epoch; True raises :class:`StoppedError` (finished
            experts stay in the cache and are reused next time).

    Returns:
        The buffer folder (open it with :func:`load_buffer`).

    Raises:
        ConfigError: invalid config; StoppedError: stopped on request.
    """
    path = buffer_dir(cfg, bundle)
    if (path / MANIFEST).is_file():
        try:
            load_buffer(path, verify=False)
            log.info("expert buffer cache hit: %s", path)
            return path
        except CheckpointError as exc:
            log.warning("rebuilding expert buffer: %s", exc)
            (path / MANIFEST).unlink()
    trainer = ExpertTrainer(cfg, bundle, device)
    while not trainer.done:
        if should_stop is not None and should_stop():
            raise StoppedError(f"expert training stopped at epoch {trainer.steps_done}/"
                               f"{trainer.total_steps}")
        info = trainer.step()
        if progress is not None:
            progress(trainer.steps_done, trainer.total_steps, info)
    return trainer.finish()
