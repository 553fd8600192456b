"""The squeeze step: train a teacher on a dataset's train split (METHODS.md §1.1 recipe, SRe2L code).

SGD (lr 0.1, momentum 0.9, weight decay 5e-4, batch 128), cosine decay to 0, RandomCrop(pad 4) +
horizontal flip, cross-entropy. Trained teachers are cached under
``cache_dir()/teachers/<key>.pt`` where the key hashes the config and the dataset (config, class
map, source and pixel content), so asking twice for the same teacher trains once.

Run ``python -m nrrdd_core.models.train --shipped`` to regenerate the built-in dataset's teacher,
package data in ``nrrdd_core/assets/teachers/`` (see ``nrrdd_core/assets/README.md``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import ConfigBase, param
from ..data.base import DataConfig, DatasetBundle, ImageSplit
from ..device import make_generator, resolve_device
from ..errors import CheckpointError, DataError, StoppedError
from ..io import atomic_write_text, cache_dir, config_key
from .registry import build_model, default_cam_layer, list_models
from .teacher import Teacher

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict], None]

#: The shipped teacher, package data of ``nrrdd_core`` (read through ``importlib.resources``, so
#: a non-editable install keeps it), and its metadata beside it (``.json``).
SHIPPED_TEACHER = resources.files("nrrdd_core") / "assets" / "teachers" / "shapes_resnet20.pt"
SHIPPED_METADATA = resources.files("nrrdd_core") / "assets" / "teachers" / "shapes_resnet20.json"
#: Where ``python -m nrrdd_core.models.train --shipped`` writes it (this source tree).
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "teachers"
SHIPPED_TEACHER_PATH = ASSETS_DIR / "shapes_resnet20.pt"


@dataclass(frozen=True)
class TeacherTrainConfig(ConfigBase):
    """Teacher training recipe (METHODS.md §1.1, "Teacher recipe (CIFAR)" [code, SRe2L])."""

    arch: str = param("resnet20_cifar", "teacher architecture", choices=tuple(list_models()),
                      source="ours")
    depth: int = param(0, "ConvNet depth; 0 = builder default (3 at 32 px, 4 at 64, 5 at 128)",
                       unit="blocks", lo=0, hi=8, source="code (RDED ConvNet)")
    width: int = param(0, "ConvNet width; 0 = builder default (128)", unit="channels", lo=0,
                       hi=1024, source="code (RDED ConvNet)")
    epochs: int = param(30, "training epochs (SRe2L: 200; fewer for demos)", unit="epochs", lo=1,
                        hi=1000, source="ours")
    lr: float = param(0.1, "SGD learning rate (cosine decay to 0, stepped per batch)", lo=0.0,
                      lo_open=True, source="code (SRe2L squeeze, CIFAR)")
    momentum: float = param(0.9, "SGD momentum", lo=0.0, hi=1.0, hi_open=True,
                            source="code (SRe2L squeeze, CIFAR)")
    weight_decay: float = param(5e-4, "SGD weight decay (all parameters)", lo=0.0,
                                source="code (SRe2L squeeze, CIFAR)")
    batch_size: int = param(128, "training batch size", unit="images", lo=1,
                            source="code (SRe2L squeeze, CIFAR)")
    augment: bool = param(True, "RandomCrop (zero padding crop_pad) + horizontal flip",
                          source="code (SRe2L squeeze, CIFAR)")
    crop_pad: int = param(4, "zero padding of the random crop", unit="px", lo=0, hi=32,
                          source="code (SRe2L squeeze, CIFAR)")
    label_smoothing: float = param(0.0, "cross-entropy label smoothing", lo=0.0, hi=1.0,
                                   hi_open=True, source="ours")
    seed: int = param(0, "seed of weight init, shuffling and augmentation", lo=0, source="ours")

    def arch_kwargs(self) -> dict:
        """Builder options: ``depth``/``width`` when set (non-zero)."""
        return {k: getattr(self, k) for k in ("depth", "width") if getattr(self, k)}


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Batched RandomCrop(size, padding=pad, zero fill) + RandomHorizontalFlip(0.5).

    Args:
        x: images ``(N,C,H,W)`` (any dtype, any device; zero is the fill value, so pass [0,1]
            or uint8 pixels, not normalised ones).
        pad: padding in px on each side; the crop offset is uniform in ``[0, 2*pad]``.
        generator: CPU generator for offsets and flips.

    Returns:
        ``(N,C,H,W)`` tensor of the same dtype and device.
    """
    n, _, h, w = x.shape
    off = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = off[0][:, None] + torch.arange(h, device=x.device)  # (N,H)
    cols = off[1][:, None] + torch.arange(w, device=x.device)  # (N,W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = xp[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing puts channels last


def dataset_identity(bundle: DatasetBundle) -> dict:
    """What identifies a dataset for caching: its config, class map, source and a sha256 of the
    pixels and labels of both splits."""
    h = hashlib.sha256()
    for t in (bundle.train.x, bundle.train.y, bundle.test.x, bundle.test.y):
        h.update(t.contiguous().numpy().tobytes())
    return {"config": bundle.config.to_dict(), "class_map": list(bundle.class_map),
            "source": bundle.source, "sha256": h.hexdigest()}


def teacher_cache_path(cfg: TeacherTrainConfig, bundle: DatasetBundle) -> Path:
    """``cache_dir()/teachers/<config_key(config + dataset identity)>.pt``."""
    key = config_key({"train": cfg.to_dict(), "data": dataset_identity(bundle)})
    return cache_dir() / "teachers" / f"{key}.pt"


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512,
             transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
             device: torch.device | str | None = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on images ``x`` ``(N,3,H,W)`` with labels ``y``
    ``(N,)``, in batches moved to ``device`` (default: the model's device; the model is not
    moved); ``transform`` (e.g. uint8 -> normalised) is applied to each batch there, else ``x``
    must be model-ready. The model runs in eval mode and its train/eval mode is restored. An
    empty ``x`` gives 0."""
    first = next(model.parameters(), None)
    dev = resolve_device(device) if device is not None else (
        first.device if first is not None else torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(dev)
            if transform is not None:
                xb = transform(xb)
            correct += int((model(xb).argmax(1).cpu() == y[i:i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / max(len(x), 1)


def evaluate_accuracy(model_or_teacher: nn.Module | Teacher, split: ImageSplit,
                      data_config: DataConfig, device: torch.device | str | None = None,
                      batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of a model (normalised input) on a split of uint8 images
    (:func:`accuracy` with ``data_config``'s normalisation; the model is not moved).

    Raises:
        DataError: the split is empty.
    """
    if len(split) == 0:
        raise DataError("cannot evaluate accuracy on an empty split")
    model = model_or_teacher.model if isinstance(model_or_teacher, Teacher) else model_or_teacher
    return accuracy(model, split.x, split.y, batch_size,
                    transform=lambda xb: data_config.normalize(xb.float().div_(255)),
                    device=device)


def train_teacher(cfg: TeacherTrainConfig, bundle: DatasetBundle,
                  device: torch.device | str = "auto", progress: ProgressFn | None = None,
                  should_stop: Callable[[], bool] | None = None, cache: bool = True) -> Teacher:
    """Train ``cfg.arch`` on ``bundle.train`` and return the frozen :class:`Teacher` with its
    test accuracy (METHODS.md §1.1).

    Deterministic for a given seed and device: weights are initialised under
    ``torch.random.fork_rng`` seeded with ``cfg.seed`` (the global RNG is left as it was); shuffling
    and augmentation use a ``torch.Generator`` seeded with ``cfg.seed``.

    Args:
        cfg: the recipe.
        bundle: dataset; images uint8 ``(N,3,S,S)``, normalised with ``bundle.config``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        progress: called after each epoch as ``progress(epoch, epochs, metrics)`` with
            ``epoch`` in ``1..epochs`` and metrics ``train_loss``, ``train_acc`` (on augmented
            batches, in [0,1]), ``lr``, ``seconds``; the last epoch adds ``test_acc``.
            Not called on a cache hit.
        should_stop: polled before every batch; True raises :class:`StoppedError`.
        cache: reuse / write ``cache_dir()/teachers/<key>.pt`` (written atomically).

    Raises:
        ConfigError: an architecture option the builder rejects.
        DataError: the train split is empty.
        StoppedError: ``should_stop()`` returned True.
    """
    if len(bundle.train) == 0:
        raise DataError(f"dataset {bundle.config.name} has no training images")
    dev = resolve_device(device)
    path = teacher_cache_path(cfg, bundle)
    if cache and path.is_file():
        try:
            log.info("teacher cache hit: %s", path)
            return Teacher.load(path, device=dev)
        except CheckpointError as exc:
            log.warning("ignoring unreadable teacher cache (%s); training again", exc)

    dc = bundle.config
    gen = make_generator(cfg.seed)
    n = len(bundle.train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    cuda_devices = [dev.index or 0] if dev.type == "cuda" else []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(cfg.seed)  # weight init and any dropout; restored on exit
        model = build_model(cfg.arch, dc.num_classes, dc.image_size, **cfg.arch_kwargs()).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
        for epoch in range(cfg.epochs):
            model.train()
            te = time.perf_counter()
            loss_sum, correct = 0.0, 0
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                if should_stop is not None and should_stop():
                    raise StoppedError(
                        f"teacher training stopped in epoch {epoch + 1}/{cfg.epochs}")
                idx = perm[i:i + cfg.batch_size]
                xb = bundle.train.x[idx].to(dev).float().div_(255)
                yb = bundle.train.y[idx].to(dev)
                if cfg.augment:
                    xb = random_crop_flip(xb, cfg.crop_pad, gen)
                logits = model(dc.normalize(xb))
                loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
            metrics = {"train_loss": loss_sum / n, "train_acc": correct / n,
                       "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - te}
            if epoch == cfg.epochs - 1 and len(bundle.test):
                metrics["test_acc"] = evaluate_accuracy(model, bundle.test, dc, dev)
            log.info("teacher epoch %d/%d %s", epoch + 1, cfg.epochs, metrics)
            if progress is not None:
                progress(epoch + 1, cfg.epochs, metrics)
    seconds = time.perf_counter() - t0
    teacher = Teacher(model=model, arch=cfg.arch, data_config=dc,
                      cam_layer=default_cam_layer(cfg.arch), arch_kwargs=cfg.arch_kwargs(),
                      test_acc=metrics.get("test_acc"), source=f"train_teacher {path.stem}")
    if cache:
        teacher.save(path, extra={"train_config": cfg.to_dict(), "train_seconds": seconds,
                                  "device": str(dev)})
    return teacher


#: Recipe of the shipped teacher: METHODS.md §1.1 with batch 64 [ours] (more steps on 5,000 images).
SHIPPED_CONFIG = TeacherTrainConfig(arch="resnet20_cifar", epochs=10, batch_size=64, seed=0)


def shipped_teacher(device: torch.device | str = "cpu") -> Teacher:
    """The built-in ``shapes`` dataset's default teacher (ResNet-20, 32 px, 10 classes): package
    data ``nrrdd_core/assets/teachers/shapes_resnet20.pt`` read through ``importlib.resources``
    (recipe and accuracy in ``nrrdd_core/assets/README.md`` and the ``.json`` beside it).

    Raises:
        CheckpointError: the file is missing or unreadable (the message gives the command that
            regenerates it).
    """
    if not SHIPPED_TEACHER.is_file():
        raise CheckpointError(f"shipped teacher missing at {SHIPPED_TEACHER}; regenerate it "
                              "with: python -m nrrdd_core.models.train --shipped")
    with resources.as_file(SHIPPED_TEACHER) as path:
        return Teacher.load(path, device=resolve_device(device))


def shipped_metadata(path: str | Path = SHIPPED_TEACHER_PATH) -> dict:
    """What the shipped teacher's ``.json`` records (computed from the checkpoint at ``path``):
    architecture, data config, measured test accuracy in [0, 1], recipe, training seconds, torch
    version, and the file's size and SHA-256 (torchvision's weights carry the same metadata)."""
    from ..io import safe_torch_load

    raw = Path(path).read_bytes()
    obj = safe_torch_load(path)
    extra = obj.get("extra", {})
    return {"file": Path(path).name, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
            "kind": obj["kind"], "arch": obj["arch"], "cam_layer": obj["cam_layer"],
            "data_config": obj["data_config"], "test_acc": obj["test_acc"],
            "source": obj["source"], "train_config": extra.get("train_config"),
            "train_seconds": extra.get("train_seconds"), "torch": extra.get("torch")}


def write_shipped_metadata(path: str | Path = SHIPPED_TEACHER_PATH) -> Path:
    """Write :func:`shipped_metadata` of ``path`` beside it as ``<stem>.json`` (atomic)."""
    path = Path(path)
    return atomic_write_text(path.with_suffix(".json"),
                             json.dumps(shipped_metadata(path), indent=1) + "\n")


def _main(argv: list[str] | None = None) -> int:
    import argparse

    from ..data import load_dataset

    ap = argparse.ArgumentParser(
        description="Regenerate the shipped teacher of the shapes dataset.")
    ap.add_argument("--shipped", action="store_true", required=True,
                    help=f"train {SHIPPED_CONFIG} on load_dataset('shapes') and write "
                         f"{SHIPPED_TEACHER_PATH}")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bundle = load_dataset("shapes")
    t0 = time.perf_counter()
    teacher = train_teacher(SHIPPED_CONFIG, bundle, device=args.device, cache=False)
    seconds = time.perf_counter() - t0
    teacher.source = "python -m nrrdd_core.models.train --shipped"
    teacher.save(SHIPPED_TEACHER_PATH, extra={"train_config": SHIPPED_CONFIG.to_dict(),
                                              "train_seconds": seconds, "dataset": "shapes",
                                              "torch": str(torch.__version__)})
    write_shipped_metadata(SHIPPED_TEACHER_PATH)
    log.info("wrote %s (+ .json): test_acc %.4f, %.0f s", SHIPPED_TEACHER_PATH, teacher.test_acc, seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
