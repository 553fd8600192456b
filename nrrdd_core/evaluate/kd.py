"""Student evaluation, KD protocol (METHODS.md §1.4, the RDED code; label modes of METHODS.md §4.4).

A fresh student is trained on a distilled set with AdamW (no weight decay on biases / norm
weights), the "smoothing LR" ``f(e) = 0.5 (1 + cos(pi e / (2E)))`` stepped per epoch, and on every
step RandomResizedCrop + flip (+ RandAugment) then CutMix / Mixup, labelled by the teacher (soft
labels or DBR distances) or by mixed one-hot labels (:mod:`nrrdd_core.labels`). Top-1 accuracy is
measured on the real test split restricted to the distilled classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..configs import ConfigBase, param
from ..data.base import DatasetBundle, to_float01, to_uint8
from ..device import make_generator, resolve_device
from ..distributed import data_parallel
from ..errors import ConfigError, DataError, NonFiniteLossError, StoppedError
from ..io import config_key
from ..labels import (DBR_VALUES, DEFAULT_TEMPERATURE, LABEL_MODES, MIX_MODES, AugSpec, LossSpec,
                      SoftLabelStore, epoch_batches, label_storage_bytes, student_loss)
from ..models import build_model, list_models
from ..models.teacher import Teacher
from ..models.train import evaluate_accuracy
from .loop import (EvalResult, ProgressFn, check_distilled_set, distilled_test_split,  # noqa: F401 (re-exported)
                   eval_epochs, make_result, run_epochs)

log = logging.getLogger(__name__)

#: Student epochs of each protocol when ``EvalConfig.epochs`` is 0 (METHODS.md §1.4: 300; METHODS.md §5.6: 1000).
PROTOCOL_EPOCHS = {"kd": 300, "edf": 1000}


@dataclass(frozen=True)
class EvalConfig(ConfigBase):
    """Student evaluation settings (METHODS.md §1.4 KD protocol; METHODS.md §4.4 label modes)."""

    protocol: str = param("kd", "evaluation protocol: kd (METHODS.md §1.4) or edf (METHODS.md §5.6)",
                          choices=("kd", "edf"),
                          source="ours (kd: RDED evaluation, edf: EDF evaluation)")
    student: str = param("convnet_bn", "student architecture (convnet_bn, resnet18_small, resnet18, "
                         "mobilenet_v2 or any registered model)", choices=tuple(list_models()),
                         source="code (RDED validation/main.py)")
    student_depth: int = param(0, "ConvNet student depth; 0 = builder default", unit="blocks",
                               lo=0, hi=8, source="code (RDED validation/main.py)")
    student_width: int = param(0, "ConvNet student width; 0 = builder default (128)",
                               unit="channels", lo=0, hi=1024,
                               source="code (RDED validation/main.py)")
    epochs: int = param(0, "student training epochs; 0 = the protocol's default (kd 300, METHODS.md §1.4; "
                        "edf 1000, METHODS.md §5.6)", unit="epochs", lo=0, hi=5000,
                        source="code (RDED validation/main.py; EDF distill/edf_distill.py)")
    batch_size: int = param(0, "batch size; 0 = the RDED rule (IPC 1/10/50 -> 10/50/100, x2 for >= 100 "
                            "classes, capped at N)", unit="images", lo=0,
                            source="code (RDED validation/main.py)")
    lr: float = param(1e-3, "AdamW learning rate", lo=0.0, lo_open=True,
                      source="code (RDED validation/main.py)")
    beta1: float = param(0.9, "AdamW beta1", lo=0.0, hi=1.0, hi_open=True,
                         source="code (RDED validation/main.py)")
    beta2: float = param(0.999, "AdamW beta2", lo=0.0, hi=1.0, hi_open=True,
                         source="code (RDED validation/main.py)")
    weight_decay: float = param(0.01, "AdamW weight decay (not on biases / norm weights)", lo=0.0,
                                source="code (RDED validation/main.py)")
    label_mode: str = param("soft", "labels: teacher soft labels, DBR distances, or hard one-hot",
                            choices=LABEL_MODES,
                            source="code (RDED soft labels) / paper (NRR-DD DBR, Eq. 6-10)")
    mix: str = param("cutmix", "batch mixing: CutMix (Beta(1,1)) or Mixup (Beta(0.8,0.8))",
                     choices=MIX_MODES, source="code (RDED validation/main.py, SRe2L relabel)")
    temperature: float = param(0.0, "soft-label temperature tau; 0 = by mix (CutMix 20, Mixup 4)",
                               lo=0.0, source="code (RDED validation/main.py)")
    factor: int = param(1, "RandomResizedCrop area scale (1/factor, 1) (RDED factor)", lo=1, hi=8,
                        source="code (RDED validation/main.py)")
    flip: bool = param(True, "random horizontal flip", source="code (RDED validation/main.py)")
    randaugment: bool = param(False, "RandAugment (2 ops) per image (NRR-DD)",
                              source="paper (NRR-DD, student augmentation)")
    alpha_dbr: float = param(1.0, "weight of the DBR distance loss L_dbr", lo=0.0,
                             source="paper (NRR-DD Eq. 6-10)")
    dbr_radius: float = param(0.4, "hinge radius r of L_sce", unit="nats", lo=0.0,
                              source="paper (NRR-DD Eq. 6-10) / ours (hinge form)")
    dbr_norm: str = param("l1", "DBR distance penalty: |dS - dT| (l1) or (dS - dT)^2 (l2)",
                          choices=("l1", "l2"), source="ours")
    dbr_temperature: float = param(1.0, "temperature tau_d of the DBR distances", lo=0.0,
                                   lo_open=True, source="ours")
    store_labels: bool = param(False, "store teacher labels per epoch and replay them (else online)",
                               source="code (SRe2L relabel, stored labels) / ours (online)")
    eval_every: int = param(0, "test every k epochs (and the last); 0 = the RDED rule (e % 10 == 9 and "
                            "e > 0.8E)", unit="epochs", lo=0,
                            source="code (RDED validation/main.py)")

    @property
    def num_epochs(self) -> int:
        """Epochs actually trained: ``epochs``, or the protocol's default when it is 0."""
        return self.epochs or PROTOCOL_EPOCHS[self.protocol]

    def aug_spec(self) -> AugSpec:
        return AugSpec(mix=self.mix, factor=self.factor, flip=self.flip, randaugment=self.randaugment)

    def loss_spec(self) -> LossSpec:
        return LossSpec(mode=self.label_mode, temperature=self.temperature or DEFAULT_TEMPERATURE[self.mix],
                        alpha_dbr=self.alpha_dbr, dbr_radius=self.dbr_radius, dbr_norm=self.dbr_norm,
                        dbr_temperature=self.dbr_temperature)

    def student_kwargs(self) -> dict:
        """Builder options: ``depth``/``width`` when set (non-zero)."""
        return {k: getattr(self, f"student_{k}") for k in ("depth", "width") if getattr(self, f"student_{k}")}


def default_batch_size(ipc: float, num_classes: int, num_images: int) -> int:
    """METHODS.md §1.4 batch rule: IPC <= 1 -> 10, <= 10 -> 50, else 100; x2 for >= 100 classes;
    capped at ``num_images``."""
    b = 10 if ipc <= 1 else 50 if ipc <= 10 else 100
    if num_classes >= 100:
        b *= 2
    return max(1, min(b, int(num_images)))


def smoothing_lr(epoch: int, epochs: int) -> float:
    """RDED's smoothing LR factor ``0.5 (1 + cos(pi e / (2E)))`` (1.0 -> 0.5), METHODS.md §1.4."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / (2 * epochs)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _store_key(x_u8: torch.Tensor, labels: torch.Tensor, teacher: Teacher, cfg: EvalConfig,
               batch_size: int, seed: int) -> str:
    h = hashlib.sha256(x_u8.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    for v in teacher.model.state_dict().values():
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return config_key({"data": h.hexdigest(), "aug": dataclasses.asdict(cfg.aug_spec()),
                       "loss": dataclasses.asdict(cfg.loss_spec()), "batch_size": batch_size, "seed": seed})


def evaluate_kd(images01: torch.Tensor, labels: torch.Tensor, teacher: Teacher, bundle: DatasetBundle,
                cfg: EvalConfig, device: str | torch.device = "auto", seed: int = 0,
                progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
                classes: Sequence[int | str] | None = None,
                label_dir: str | Path | None = None) -> EvalResult:
    """Train a fresh student on a distilled set and test it (METHODS.md §1.4).

    Args:
        images01: distilled images ``(N,3,S,S)`` float in [0, 1] (any device), ``S`` = the
            teacher's input size. They are quantised to uint8 first, as an exported set would be.
        labels: ``(N,)`` int64 labels in the teacher's (= ``bundle``'s) label space.
        teacher: frozen teacher; its data config normalises every image; the student has
            ``teacher.num_classes`` logits.
        bundle: dataset whose *test* split is used, restricted to ``classes``.
        cfg: the settings.
        device: training device.
        seed: seeds the student's weights (``fork_rng``) and the run's generator (order, crops,
            flips, mixing).
        progress: ``progress(epoch, epochs, metrics)`` after each epoch (``epoch`` 1-based; metrics
            as in :attr:`EvalResult.history`).
        should_stop: polled before every epoch and batch; True raises :class:`StoppedError`.
        classes: distilled classes (names or indices of ``bundle``); default: those in ``labels``.
        label_dir: with ``cfg.store_labels``, where the label store ``labels_<mode>/`` is written
            (and replayed from if it already holds this setting's epochs); default: a temporary
            folder removed afterwards.

    Returns:
        :class:`EvalResult` with accuracies in [0, 1].

    Raises:
        ConfigError: a student option its builder rejects.
        DataError: empty or malformed set, labels outside the teacher's classes, no test images.
        TeacherMismatchError: teacher and dataset disagree.
        NonFiniteLossError: the student's loss became NaN / inf (names the epoch).
        StoppedError: ``should_stop()`` returned True.
    """
    t0 = time.perf_counter()
    if cfg.protocol != "kd":
        raise ConfigError(f"evaluate_kd runs the kd protocol, not {cfg.protocol!r}")
    dev = resolve_device(device)
    teacher.check_compatible(bundle.config)
    dc = teacher.data_config
    labels = check_distilled_set(images01, labels, dc.image_size)
    if int(labels.min()) < 0 or int(labels.max()) >= teacher.num_classes:
        raise DataError(f"labels must lie in [0, {teacher.num_classes}) (the teacher's classes)")
    cls, test = distilled_test_split(bundle, labels, classes)

    x_u8 = to_uint8(images01.detach().cpu())
    n = len(x_u8)
    batch_size = cfg.batch_size or default_batch_size(n / len(cls), len(cls), n)
    batch_size = min(batch_size, n)
    epochs = cfg.num_epochs
    aug_spec, loss_spec = cfg.aug_spec(), cfg.loss_spec()
    teacher.to(dev)
    x01 = to_float01(x_u8).to(dev)
    y = labels.to(dev)
    gen = make_generator(seed)
    cuda_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        student = build_model(cfg.student, teacher.num_classes, dc.image_size, **cfg.student_kwargs()).to(dev)
    model, part = data_parallel(student, dev)  # under torchrun: DDP over the ranks, else as is
    opt = torch.optim.AdamW(_param_groups(student, cfg.weight_decay), lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: smoothing_lr(e, epochs))
    tested = set(eval_epochs(epochs, cfg.eval_every))

    with tempfile.TemporaryDirectory(prefix="nrrdd_labels_") as tmp:
        store = None
        if cfg.store_labels and cfg.label_mode != "hard":
            root = Path(label_dir if label_dir is not None else tmp) / f"labels_{cfg.label_mode}"
            store = SoftLabelStore(root, cfg.label_mode,
                                   num_values=teacher.num_classes if cfg.label_mode == "soft" else DBR_VALUES,
                                   num_images=n, key=_store_key(x_u8, labels, teacher, cfg, batch_size, seed))
        def train_epoch(epoch: int) -> dict:
            student.train()
            lr = opt.param_groups[0]["lr"]
            sums: dict[str, float] = {}
            for batch in epoch_batches(x01, y, batch_size, gen, aug_spec, loss_spec, teacher, store, epoch):
                if should_stop is not None and should_stop():
                    raise StoppedError(f"student training stopped in epoch {epoch + 1}/{epochs}")
                batch = part(batch)
                logits = model(dc.normalize(batch.x_mix01))
                loss, terms = student_loss(logits, batch.values, batch.y, batch.y_perm, batch.lam, loss_spec)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"student loss is {float(loss.detach())} in epoch {epoch + 1}; "
                                             "lower the learning rate", step=epoch, term="loss")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for k, v in {"loss": float(loss.detach()), **terms}.items():
                    sums[k] = sums.get(k, 0.0) + v * len(batch.y)
            sched.step()
            return {**{k: v / n for k, v in sums.items()}, "lr": lr}

        history = run_epochs(epochs, train_epoch, lambda: evaluate_accuracy(student, test, dc, dev),
                             tested, progress, should_stop)
        label_bytes = label_storage_bytes(store.files() if store is not None else [])
    conf = {**cfg.to_dict(), "epochs": epochs, "seed": int(seed), "batch_size": batch_size}
    return make_result(history, t0, len(test), conf, label_bytes)


def random_real_subset(bundle: DatasetBundle, classes: Sequence[int | str] | None, ipc: int,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The random-real baseline: ``ipc`` random training images per class.

    Returns:
        ``(images01, labels)``: float32 ``(len(classes) * ipc, 3, S, S)`` in [0, 1] and int64 labels
        in ``bundle``'s label space, class by class.

    Raises:
        ConfigError: ``ipc < 1``.
        DataError: unknown class, or a class with fewer than ``ipc`` training images.
    """
    if int(ipc) < 1:
        raise ConfigError(f"ipc must be >= 1, got {ipc}")
    gen = make_generator(seed)
    xs, ys = [], []
    for c in bundle.resolve_classes(classes):
        idx = bundle.train.indices_of(c)
        if len(idx) < ipc:
            raise DataError(f"class {bundle.config.class_names[c]!r} has {len(idx)} training images, "
                            f"fewer than ipc={ipc}")
        pick = idx[torch.randperm(len(idx), generator=gen)[:ipc]]
        xs.append(bundle.train.float01(pick))
        ys.append(torch.full((ipc,), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)
