"""Student evaluation, EDF protocol (METHODS.md §5.6; MTT / DATM / EDF code).

A fresh ConvNet-IN (the distillation architecture) is trained on the distilled images with
SGD (lr = the learned student lr, momentum 0.9, weight decay 5e-4), the lr multiplied by 0.1 at
half of the epochs, DSA on every batch and soft cross-entropy against ``softmax(Y)`` (the learned
label logits; plain cross-entropy with hard labels when no logits are given). Top-1 accuracy is
measured on the real test split restricted to the distilled classes.

Like the official code, the student trains on the distilled float tensor as it was optimised
(``images_float``: normalised, ZCA-whitened when the experts were, unclipped) when the run
carries it; otherwise on the [0,1] images (8-bit PNGs of a saved run), normalised and whitened
here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.base import DatasetBundle
from ..device import make_generator, resolve_device
from ..dsa import DSA_STRATEGIES, dsa
from ..errors import ConfigError, DataError, NonFiniteLossError
from ..losses import soft_cross_entropy
from ..models.flat import seeded_model
from ..models.teacher import Teacher
from ..models.train import accuracy
from ..zca import zca_for
from .kd import EvalConfig
from .loop import (EvalResult, check_distilled_set, distilled_test_split, eval_epochs, make_result,
                   run_epochs)

log = logging.getLogger(__name__)

#: Keyword arguments of :func:`evaluate_edf` taken from a run's extras
#: (``EDFDistiller.export_extras()``, ``Run.extras``).
RUN_EXTRAS = ("images_float", "label_logits", "syn_lr", "arch_kwargs", "zca_eps")

#: METHODS.md §5.6 defaults when the caller gives none (epochs: ``EvalConfig.num_epochs``).
DEFAULT_LR = 0.01
DEFAULT_BATCH = 256


def evaluate_edf(images01: torch.Tensor, labels: torch.Tensor, teacher: Teacher | None,
                 bundle: DatasetBundle, cfg: EvalConfig, device: str | torch.device = "auto",
                 seed: int = 0, progress: Callable[[int, int, dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 classes: Sequence[int | str] | None = None, *,
                 label_logits: torch.Tensor | None = None, syn_lr: float | None = None,
                 arch_kwargs: dict | None = None, zca_eps: float | None = None,
                 epochs: int | None = None, images_float: torch.Tensor | None = None) -> EvalResult:
    """Train a fresh ConvNet-IN on a distilled set and test it (METHODS.md §5.6).

    Args:
        images01: ``(N,3,S,S)`` float images in [0, 1] (any device).
        labels: ``(N,)`` int64 labels in ``bundle``'s label space, or ``(N,C)`` label logits.
        teacher: unused by the protocol (kept for the dispatcher's signature; may be None).
        bundle: dataset: its config normalises the images, its test split is used.
        cfg: :class:`EvalConfig`; used fields: ``num_epochs`` (unless ``epochs`` is given),
            ``batch_size`` (0 = 256 capped at N), ``student_depth``/``student_width`` (unless
            ``arch_kwargs``), ``eval_every``.
        device, seed: training device; seed of the weights, batch order and DSA.
        progress: ``progress(epoch, epochs, metrics)`` after each epoch (1-based).
        should_stop: polled before every epoch; True raises :class:`StoppedError`.
        classes: distilled classes; default: those in the labels.
        label_logits: ``(N,C)`` learned logits Y (soft CE against ``softmax(Y)``).
        syn_lr: learned student lr (default 0.01).
        arch_kwargs: ConvNet-IN ``depth``/``width`` of the distillation network.
        zca_eps: the ZCA eps the experts used (None = no ZCA); ZCA is refitted on ``bundle``.
        epochs: student epochs (default ``cfg.num_epochs``: 1000 when ``cfg.epochs`` is 0).
        images_float: ``(N,3,S,S)`` float32, the distilled images in the space they were optimised
            in (``EDFDistiller.export_extras()["images_float"]``): trained on instead of
            ``images01`` (which then only fixes N and the shape); ``config["inputs"]`` says which.

    Returns:
        :class:`EvalResult` with accuracies in [0, 1].

    Raises:
        DataError: malformed set or no test images. ConfigError: bad lr or architecture.
        NonFiniteLossError: the loss became NaN/inf. StoppedError: stopped on request.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    dc = bundle.config
    if labels.ndim == 2 and label_logits is None:
        label_logits, labels = labels, labels.argmax(1)
    n = len(images01)
    labels = check_distilled_set(images01, labels, dc.image_size, "the dataset")
    if label_logits is not None and len(label_logits) != n:
        raise DataError(f"need one row of label logits per image: {len(label_logits)} for {n}")
    lr = float(syn_lr) if syn_lr is not None else DEFAULT_LR
    if not lr > 0:
        raise ConfigError(f"EDF evaluation lr must be > 0, got {lr}")
    epochs = int(epochs or cfg.num_epochs)
    _, test = distilled_test_split(bundle, labels, classes)

    zca = zca_for(bundle, zca_eps) if zca_eps else None

    def prepare(x01: torch.Tensor) -> torch.Tensor:
        x = dc.normalize(x01.float())
        return zca(x) if zca is not None else x

    if images_float is not None:
        if tuple(images_float.shape) != tuple(images01.shape):
            raise DataError(f"images_float {tuple(images_float.shape)} does not match the images "
                            f"{tuple(images01.shape)}")
        x = images_float.detach().float().to(dev)
    else:
        x = prepare(images01.detach().cpu()).to(dev)
    x_test, y_test = prepare(test.float01()), test.y
    y = labels.to(dev)
    targets = label_logits.detach().to(dev).float() if label_logits is not None else None
    gen = make_generator(seed)
    kw = dict(arch_kwargs) if arch_kwargs else cfg.student_kwargs()
    model = seeded_model(dc.num_classes, dc.image_size, kw, gen).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    batch = min(cfg.batch_size or DEFAULT_BATCH, n)
    tested = set(eval_epochs(epochs, cfg.eval_every))

    def train_epoch(epoch: int) -> dict:
        if epoch == epochs // 2 and epoch > 0:
            for g in opt.param_groups:
                g["lr"] *= 0.1
        model.train()
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(batch):
            idx = idx.to(dev)
            out = model(dsa(x[idx], gen, DSA_STRATEGIES))
            loss = soft_cross_entropy(out, targets[idx]) if targets is not None else F.cross_entropy(out, y[idx])
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"EDF student loss is {float(loss.detach())} in epoch "
                                         f"{epoch + 1}; lower the lr", step=epoch, term="loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        return {"loss": total / n, "lr": opt.param_groups[0]["lr"]}

    history = run_epochs(epochs, train_epoch, lambda: accuracy(model, x_test, y_test), tested,
                         progress, should_stop, "EDF evaluation")
    conf = {**cfg.to_dict(), "protocol": "edf", "seed": int(seed), "batch_size": batch, "epochs": epochs,
            "lr": lr, "student": "convnet_in", "arch": "convnet_in", "arch_kwargs": kw,
            "zca_eps": zca_eps, "label_mode": "soft" if targets is not None else "hard",
            "soft_labels": targets is not None,
            "inputs": "float" if images_float is not None else "images01"}
    return make_result(history, t0, len(test), conf)
