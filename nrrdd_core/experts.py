"""Expert trajectories for trajectory matching (METHODS.md §5.1; MTT / DATM / EDF code).

An *expert* is a ConvNet-IN trained on the real training split with plain SGD (momentum 0,
wd 0; lr 0.01 and batch 256 in the papers, smaller CPU defaults in :class:`ExpertConfig`),
cross-entropy and DSA augmentation (METHODS.md §5.2). Its *trajectory* is
the flat parameter vector (``parameters()`` order, float32) at initialisation and after every
epoch: ``E+1`` snapshots of length ``P``.

On disk a buffer is a folder ``cache_dir()/experts/<key>/`` (key from the config and the
dataset identity) holding one ``expert_NNN.pt`` per expert (``{"kind", "trajectory" (E+1,P),
"test_acc"}``), an optional ``zca.pt`` and ``manifest.json`` (written last, with each file's size
and SHA-256). Every file is written atomically and read with ``weights_only=True``; a missing,
truncated or corrupt file raises :class:`~nrrdd_core.errors.CheckpointError`.

Also here, shared with the EDF method and its evaluation: :func:`seeded_model` (a ConvNet-IN
initialised from a generator), :class:`ParamLayout` (flat vector <-> named parameter views),
:func:`soft_cross_entropy` and :class:`ZCA` whitening (kornia-style, eps 0.1).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .configs import ConfigBase, param
from .data.base import DatasetBundle
from .device import make_generator, resolve_device
from .dsa import DSA_STRATEGIES, check_strategies, dsa
from .errors import CheckpointError, ConfigError, StoppedError
from .io import atomic_torch_save, atomic_write_json, cache_dir, config_key, safe_torch_load
from .models.train import accuracy

log = logging.getLogger(__name__)

EXPERT_KIND = "nrrdd-expert-v1"
MANIFEST = "manifest.json"
ARCH = "convnet_in"

Progress = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class ExpertConfig(ConfigBase):
    """How to train the expert trajectories (METHODS.md §5.1). Defaults: small, for the built-in
    dataset on a CPU (3 experts x 20 epochs of a width-32 ConvNet-IN, plain SGD lr 0.2, batch 32,
    200 images per class, DSA: about 1 min per expert on one CPU thread); use :meth:`for_dataset`
    for the published settings.

    Measured on ``shapes`` (one expert, one CPU thread, test accuracy after E epochs / seconds):
    the former defaults lr 0.03, batch 64 reached 0.22-0.35 after 15-26 epochs (36-60 s); lr 0.1
    batch 64: 0.27 at 12; lr 0.3 batch 64: 0.26 at 12; lr 0.01 momentum 0.9: 0.39 at 14; lr 0.1
    batch 32: 0.47 at 14; lr 0.1 batch 16: 0.43-0.58 at 11-13; lr 0.2 batch 16: 0.64 at 12 (113 s
    under load); width 64 was ~5x slower per epoch; 500 images per class: 0.41 after 5 epochs
    (86 s). Chosen lr 0.2 batch 32: 0.51 at 15 epochs (44 s), 0.65 at 20 (61 s)."""

    num_experts: int = param(3, "number of expert trajectories", unit="experts", lo=1, source="ours")
    epochs: int = param(20, "training epochs per expert (E; E+1 snapshots are saved)",
                        unit="epochs", lo=1, source="ours")
    lr: float = param(0.2, "SGD learning rate (constant; 0.01 in the papers at batch 256)", lo=0.0,
                      lo_open=True, source="ours")
    momentum: float = param(0.0, "SGD momentum", lo=0.0, hi=1.0, hi_open=True, source="code")
    weight_decay: float = param(0.0, "SGD weight decay", lo=0.0, source="code")
    batch_size: int = param(32, "real images per SGD step (256 in the papers)", unit="images",
                            lo=1, source="ours")
    depth: int = param(0, "ConvNet-IN depth (0 = by image size: 3 at 32 px, 4 at 64, 5 at 128)",
                       lo=0, hi=8, source="code")
    width: int = param(32, "ConvNet-IN channels (128 in the papers)", unit="channels", lo=1,
                       source="ours")
    train_per_class: int = param(200, "real training images per class (the first ones in stored "
                                 "order); 0 = all", unit="images", lo=0, source="ours")
    dsa: bool = param(True, "DSA augmentation on every batch (METHODS.md §5.2)", source="code")
    dsa_strategies: str = param(",".join(DSA_STRATEGIES), "comma-separated DSA strategies",
                                source="code", ui=False)
    zca: bool = param(False, "ZCA-whiten the images (MTT/DATM do for CIFAR and Tiny)", source="code")
    zca_eps: float = param(0.1, "ZCA regulariser eps", lo=0.0, lo_open=True, source="code")
    gsam: bool = param(False, "GSAM optimiser (DATM/EDF experts); not implemented", source="code")
    gsam_rho: float = param(0.01, "GSAM rho", lo=0.0, source="code", ui=False)
    gsam_alpha: float = param(0.3, "GSAM alpha", lo=0.0, source="code", ui=False)
    seed: int = param(0, "seed of the expert initialisations, shuffles and augmentations", lo=0)

    def validate(self) -> None:
        """Field ranges, plus: GSAM is not implemented, DSA strategies must be valid.

        Raises:
            ConfigError: naming the field.
        """
        super().validate()
        if self.gsam:
            raise ConfigError("gsam=True: the GSAM expert optimiser is not implemented in this "
                              "version; use plain SGD (gsam=False, the MTT setting)")
        check_strategies(self.dsa_strategies.split(","))

    @classmethod
    def for_dataset(cls, name: str, **overrides) -> "ExpertConfig":
        """The published expert settings (METHODS.md §5.1; MTT/DATM buffers) for a dataset family:
        CIFAR-10/100: 100 experts x 50 epochs, ConvNet-IN-3 width 128, ZCA; Tiny-ImageNet:
        depth 4, ZCA; ImageNet subsets (imagenette, imagewoof, ... at 128 px): depth 5, no ZCA.
        Anything else (e.g. the built-in ``shapes``) gets the small defaults.

        Raises:
            ConfigError: an override is invalid.
        """
        n = name.lower()
        paper = dict(num_experts=100, epochs=50, width=128, lr=0.01, batch_size=256,
                     train_per_class=0)
        table = {"cifar": dict(paper, depth=3, zca=True), "tiny": dict(paper, depth=4, zca=True),
                 "image": dict(paper, depth=5, zca=False)}
        base = next((v for k, v in table.items() if n.startswith(k)), {})
        return cls.from_dict({**base, **overrides})

    def arch_kwargs(self, image_size: int) -> dict:
        """``{"depth", "width"}`` of the expert ConvNet-IN for ``image_size`` px input."""
        from .models.convnet import default_depth

        return {"depth": self.depth or default_depth(image_size), "width": self.width}


# ---- shared helpers -----------------------------------------------------------------------------

def seeded_model(num_classes: int, image_size: int, arch_kwargs: dict,
                 generator: torch.Generator) -> nn.Module:
    """A freshly initialised ConvNet-IN whose initial weights depend only on ``generator``
    (PyTorch's default initialisation run under a forked global RNG seeded from it; the
    global RNG state is restored)."""
    from .models.registry import build_model

    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(ARCH, num_classes, image_size, **arch_kwargs)


class ParamLayout:
    """Names and shapes of a model's parameters in ``parameters()`` order; converts between one
    flat vector ``(P,)`` and a ``{name: view}`` dict for ``torch.func.functional_call``."""

    def __init__(self, model: nn.Module):
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.numel = sum(self.sizes)

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """The model's parameters as one detached float32 vector ``(P,)``."""
        return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` ``(P,)`` shaped like the parameters (differentiable)."""
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def load_into(self, model: nn.Module, flat: torch.Tensor) -> nn.Module:
        """Copy ``flat`` ``(P,)`` into the model's parameters (in place) and return the model."""
        with torch.no_grad():
            for p, t in zip(model.parameters(), flat.split(self.sizes)):
                p.copy_(t.view_as(p))
        return model


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c softmax(target)_c log softmax(logits)_c`` (METHODS.md §5.3);
    both ``(B, C)``."""
    return -(F.softmax(target_logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()


class ZCA:
    """ZCA whitening of flattened normalised images (kornia ``ZCAWhitening`` maths, MTT code):
    ``W = U diag(1/sqrt(S + eps)) U^T`` from the unbiased covariance of the training images.

    Attributes:
        mean: ``(D,)`` with ``D = 3 H W``; matrix: ``(D, D)`` whitening; inverse: ``(D, D)``.
    """

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor, inverse: torch.Tensor):
        self.mean, self.matrix, self.inv = mean, matrix, inverse

    @classmethod
    def fit(cls, x: torch.Tensor, eps: float = 0.1) -> "ZCA":
        """Fit on ``(N,3,H,W)`` normalised images (float64 internally)."""
        flat = x.reshape(len(x), -1).double()
        mean = flat.mean(0)
        xc = flat - mean
        cov = xc.T @ xc / max(len(x) - 1, 1)
        u, s, _ = torch.linalg.svd(cov)
        w = u @ torch.diag((s + eps).rsqrt()) @ u.T
        winv = u @ torch.diag((s + eps).sqrt()) @ u.T
        return cls(mean.float(), w.float(), winv.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten ``(N,3,H,W)`` normalised images (same shape)."""
        m, w = self.mean.to(x.device), self.matrix.to(x.device)
        return ((x.reshape(len(x), -1) - m) @ w).view_as(x)

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Whitened ``(N,3,H,W)`` -> normalised images (same shape)."""
        m, wi = self.mean.to(z.device), self.inv.to(z.device)
        return (z.reshape(len(z), -1) @ wi + m).view_as(z)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "matrix": self.matrix, "inverse": self.inv}


def dataset_identity(bundle: DatasetBundle) -> dict:
    """What identifies a dataset for caching: config, class map and a SHA-256 of the train split."""
    h = hashlib.sha256(bundle.train.x.contiguous().numpy().tobytes())
    h.update(bundle.train.y.contiguous().numpy().tobytes())
    return {"config": bundle.config.to_dict(), "class_map": list(bundle.class_map),
            "n_train": len(bundle.train), "n_test": len(bundle.test), "train_sha256": h.hexdigest()}


def zca_for(bundle: DatasetBundle, eps: float = 0.1) -> ZCA:
    """The ZCA of ``bundle``'s normalised training images, cached under
    ``cache_dir()/zca/<key>.pt``."""
    path = cache_dir() / "zca" / f"{config_key({'data': dataset_identity(bundle), 'eps': eps})}.pt"
    if path.is_file():
        d = safe_torch_load(path)
        return ZCA(d["mean"], d["matrix"], d["inverse"])
    log.info("fitting ZCA (eps %s) on %d images", eps, len(bundle.train))
    zca = ZCA.fit(bundle.config.normalize(bundle.train.float01()), eps)
    atomic_torch_save(zca.state_dict(), path)
    return zca


def _first_per_class(y: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """Indices of the first ``k`` images of every class (all when ``k == 0``), in stored order."""
    if k <= 0:
        return torch.arange(len(y))
    rank = torch.zeros_like(y)
    for c in range(num_classes):
        m = y == c
        rank[m] = torch.arange(int(m.sum()))
    return torch.nonzero(rank < k).flatten()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- the buffer on disk -------------------------------------------------------------------------

class ExpertBuffer:
    """A verified expert buffer folder (see :func:`load_buffer`).

    Attributes:
        path: the folder; manifest: the parsed ``manifest.json``; num_experts, epochs (E),
        num_params (P), arch_kwargs, num_classes, image_size, test_accs, zca (a :class:`ZCA`
        or None).
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.num_experts = len(manifest["experts"])
        self.epochs = int(manifest["epochs"])
        self.num_params = int(manifest["num_params"])
        self.arch_kwargs = dict(manifest["arch_kwargs"])
        self.num_classes = int(manifest["num_classes"])
        self.image_size = int(manifest["image_size"])
        self.test_accs = [float(e["test_acc"]) for e in manifest["experts"]]
        self.zca = None
        if manifest.get("zca_file"):
            d = safe_torch_load(path / manifest["zca_file"])
            self.zca = ZCA(d["mean"], d["matrix"], d["inverse"])
        self._cache: tuple[int, torch.Tensor] | None = None

    def trajectory(self, i: int) -> torch.Tensor:
        """Expert ``i``'s snapshots ``(E+1, P)`` float32 on CPU (the last one is kept in memory).

        Raises:
            CheckpointError: checksum mismatch, unreadable file or wrong shape.
        """
        if self._cache is not None and self._cache[0] == i:
            return self._cache[1]
        entry = self.manifest["experts"][i]
        f = self.path / entry["file"]
        if _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"expert buffer file {f} is corrupt (checksum mismatch); "
                                  f"delete {self.path} and retrain")
        obj = safe_torch_load(f)
        traj = obj.get("trajectory") if isinstance(obj, dict) else None
        if obj.get("kind") != EXPERT_KIND or not isinstance(traj, torch.Tensor) or \
                tuple(traj.shape) != (self.epochs + 1, self.num_params):
            raise CheckpointError(f"{f} is not an expert trajectory of shape "
                                  f"({self.epochs + 1}, {self.num_params}); delete the buffer folder")
        self._cache = (i, traj.float())
        return self._cache[1]


def load_buffer(path: str | Path, verify: bool = True) -> ExpertBuffer:
    """Open an expert buffer folder written by :func:`train_experts`.

    Args:
        path: the buffer folder (or its ``manifest.json``).
        verify: also check every file's SHA-256 against the manifest (reads all files once).

    Raises:
        CheckpointError: missing/corrupt manifest, a missing file, a size that differs from the
            manifest (truncated) or a checksum mismatch (corrupt).
    """
    path = Path(path)
    if path.name == MANIFEST:
        path = path.parent
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"no expert buffer at {path} ({MANIFEST} missing): run `nrrdd experts`")
    try:
        manifest = json.loads(mf.read_text())
        files = [manifest["experts"][i] for i in range(len(manifest["experts"]))]
        if manifest.get("zca_file"):
            files.append({"file": manifest["zca_file"], **manifest["zca_check"]})
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"corrupt expert buffer manifest {mf}: {exc}") from exc
    for e in files:
        f = path / e["file"]
        if not f.is_file():
            raise CheckpointError(f"expert buffer file missing: {f}; delete {path} and retrain")
        if f.stat().st_size != int(e["bytes"]):
            raise CheckpointError(f"expert buffer file {f} is truncated or changed "
                                  f"({f.stat().st_size} bytes, manifest says {e['bytes']}); "
                                  f"delete {path} and retrain")
        if verify and _sha256(f) != e["sha256"]:
            raise CheckpointError(f"expert buffer file {f} is corrupt (checksum mismatch); "
                                  f"delete {path} and retrain")
    return ExpertBuffer(path, manifest)


def buffer_dir(cfg: ExpertConfig, bundle: DatasetBundle) -> Path:
    """The cache folder of the buffer of ``cfg`` on ``bundle``:
    ``cache_dir()/experts/<config_key(cfg + dataset identity)>``."""
    return cache_dir() / "experts" / config_key({"cfg": cfg.to_dict(), "arch": ARCH,
                                                  "data": dataset_identity(bundle)})


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
            experts.append({"file": f.name, "bytes": f.stat().st_size, "sha256": _sha256(f),
                            "test_acc": float(obj["test_acc"])})
        manifest = {"kind": EXPERT_KIND, "config": cfg.to_dict(), "arch": ARCH,
                    "arch_kwargs": self.arch_kwargs, "num_classes": self.bundle.num_classes,
                    "image_size": dc.image_size, "num_params": num_params, "epochs": cfg.epochs,
                    "dataset": dataset_identity(self.bundle), "experts": experts}
        if self.zca is not None:
            zf = atomic_torch_save(self.zca.state_dict(), self.path / "zca.pt")
            manifest["zca_file"] = zf.name
            manifest["zca_check"] = {"bytes": zf.stat().st_size, "sha256": _sha256(zf)}
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
