"""EDF: trajectory matching (DATM) with Common Pattern Dropout and Discriminative Area
Enhancement (METHODS.md §5.3-4.5, 4.7).

State: synthetic images ``x~ (N,3,H,W)`` (normalised pixels; ZCA-whitened when the expert
buffer was trained with ZCA), learnable label logits ``Y (N,C)`` (C = classes of the dataset)
and a learnable student learning rate ``eta``. One :meth:`EDFDistiller.step` is one outer
iteration; when no expert buffer is given and none is cached, the first steps (phase
``"experts"``) train the buffer with :class:`~nrrdd_core.experts.ExpertConfig` defaults, one
expert epoch per step.

alpha = 0 (``cpd_alpha``) and beta = 0 (``dae_beta``) give plain DATM.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ..configs import ConfigBase, param
from ..device import resolve_device
from ..dsa import DSA_STRATEGIES, check_strategies, dsa
from ..errors import ConfigError, ResourceError, TeacherMismatchError
from ..experts import (MANIFEST, ExpertBuffer, ExpertConfig, ExpertTrainer, ParamLayout, buffer_dir,
                       load_buffer, seeded_model, soft_cross_entropy)
from ..unroll import UNROLLS, recompute_bytes, unroll_recompute
from .base import Distiller, StepRecord, register_method

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EDFConfig(ConfigBase):
    """EDF / DATM settings (METHODS.md §5.3-4.5). Defaults are small, for the built-in dataset on a CPU
    (the papers use syn_steps 80, batch_syn 100+ and thousands of iterations on a GPU)."""

    iterations: int = param(200, "outer iterations (one per step)", unit="steps", lo=1, source="ours")
    syn_steps: int = param(8, "student SGD steps unrolled per iteration (N_syn)", unit="steps",
                           lo=1, source="ours")
    expert_epochs: int = param(2, "expert epochs the student must match (M)", unit="epochs", lo=1,
                               source="code")
    min_start_epoch: int = param(0, "lowest start epoch T-", unit="epochs", lo=0, source="code")
    current_max_start_epoch: int = param(4, "initial upper bound T of the start epoch",
                                         unit="epochs", lo=1, source="code")
    max_start_epoch: int = param(10, "final upper bound T+ of the start epoch", unit="epochs",
                                 lo=1, source="code")
    expansion_iterations: int = param(100, "iterations over which the bound rises from T to T+ "
                                      "(E_exp)", unit="steps", lo=1, source="code")
    batch_syn: int = param(25, "synthetic images per unrolled step (capped at N)", unit="images",
                           lo=1, source="ours")
    lr_img: float = param(100.0, "SGD lr of the images (momentum 0.5)", lo=0.0, source="code")
    lr_lr: float = param(1e-5, "SGD lr of the student lr (momentum 0.5)", lo=0.0, source="code")
    lr_y: float = param(2.0, "SGD lr of the label logits (momentum 0.9)", lo=0.0, source="code")
    lr_teacher: float = param(0.0, "initial student lr eta; 0 = the experts' lr (0.01 in the "
                              "papers)", lo=0.0, source="code")
    max_loss: float = param(10.0, "skip the update when the matching loss exceeds this",
                            lo=0.0, lo_open=True, source="ours")
    cpd_alpha: float = param(0.0, "CPD: fraction of parameters with the smallest errors dropped "
                             "(0 = off; 0.25 at IPC10, 0.375 at IPC50)", lo=0.0, source="code")
    dae_beta: float = param(0.0, "DAE: offset added to the CAM above its mean (0 = off; 1, 2 for "
                            "ImageWoof)", lo=0.0, source="code")
    dae_interval: int = param(10, "DAE every k iterations (50 at IPC1, 100 at IPC10)",
                              unit="steps", lo=1, source="code")
    dae_target: str = param("argmax_y", "DAE CAM class: argmax of the learned label logits Y "
                            "(METHODS.md §5.5, released code) or the class each image is distilled for "
                            "(stable when weak experts make argmax Y drift)",
                            choices=("argmax_y", "distilled_class"), source="code")
    cam_method: str = param("gradcam_torch", "CAM family for DAE (the code uses Smooth Grad-CAM++)",
                            choices=("gradcam_torch", "gradcam++", "cam", "xgradcam", "layercam",
                                     "eigencam", "scorecam", "gradcam"), source="code")
    cam_model: str = param("teacher", "CAM model: the dataset's teacher, or an ImageNet ResNet-18 "
                           "(ImageNet subsets; class index mapped to ImageNet)",
                           choices=("teacher", "imagenet_resnet18"), source="code")
    dsa: bool = param(True, "DSA on the synthetic mini-batches", source="code")
    dsa_strategies: str = param(",".join(DSA_STRATEGIES), "comma-separated DSA strategies",
                                source="code", ui=False)
    buffer: str = param("", "expert buffer folder; empty = train/reuse ExpertConfig defaults",
                        source="ours", ui=False)
    memory_budget_mb: float = param(0.0, "memory the unrolled graph may use; 0 = free device "
                                    "memory", unit="MiB", lo=0.0, source="ours", ui=False)
    unroll: str = param("plain", "student unroll: plain (graph of all syn_steps kept, memory grows "
                        "with syn_steps) or recompute (each step recomputed in the backward pass: "
                        "same gradients, constant graph memory, about 2x the time)",
                        choices=UNROLLS, source="ours (TESLA)")

    def validate(self) -> None:
        """Ranges, plus: CPD alpha < 1, T- < T <= T+, valid DSA strategies and CAM method.

        Raises:
            ConfigError: naming the field.
        """
        super().validate()
        if self.cpd_alpha >= 1.0:
            raise ConfigError(f"cpd_alpha={self.cpd_alpha}: CPD drops floor(alpha*P) of the P "
                              "parameter errors, so alpha >= 1 drops all of them and the loss is "
                              "0/0 (the released default 1.0 gives NaN); use 0 <= alpha < 1")
        if not self.min_start_epoch < self.current_max_start_epoch <= self.max_start_epoch:
            raise ConfigError("start epochs must satisfy min_start_epoch < current_max_start_epoch "
                              f"<= max_start_epoch; got {self.min_start_epoch}, "
                              f"{self.current_max_start_epoch}, {self.max_start_epoch}")
        check_strategies(self.dsa_strategies.split(","))

    def upper_bound(self, it: int) -> int:
        """Exclusive upper bound of the start epoch at iteration ``it`` (0-based): rises linearly
        from T to T+ over ``expansion_iterations`` (DATM code)."""
        if it >= self.expansion_iterations:
            return self.max_start_epoch
        span = self.max_start_epoch - self.current_max_start_epoch
        return self.current_max_start_epoch + int(span * it / self.expansion_iterations)


# ---- the maths, as functions (tested directly) ---------------------------------------------------

def unroll_student(net: nn.Module, layout: ParamLayout, theta0: torch.Tensor, x_syn: torch.Tensor,
                   y_logits: torch.Tensor, lr: torch.Tensor, syn_steps: int, batch_syn: int,
                   generator: torch.Generator, strategies: tuple[str, ...] | None) -> torch.Tensor:
    """Unroll ``syn_steps`` SGD steps of the student from ``theta0`` (METHODS.md §5.3 step 2).

    Each step takes the next ``batch_syn`` indices of a random permutation of the N images
    (refilled when used up, MTT code), applies DSA (when ``strategies``), computes the soft
    cross-entropy against ``softmax(y_logits)`` through ``torch.func.functional_call`` on views
    of ONE flat vector, and steps ``theta <- theta - lr * grad`` with ``create_graph=True``.

    Args:
        net: the student architecture (its own parameters are not used).
        layout: the :class:`ParamLayout` of ``net``.
        theta0: ``(P,)`` start parameters (no grad needed).
        x_syn: ``(N,3,H,W)`` synthetic images (normalised), usually requiring grad.
        y_logits: ``(N,C)`` label logits, usually requiring grad.
        lr: scalar learnable student lr.
        syn_steps, batch_syn: N_syn and the mini-batch size (capped at N).
        generator: CPU generator for the permutations and DSA.
        strategies: DSA strategies, or None for no augmentation.

    Returns:
        ``theta_N`` ``(P,)``, differentiable with respect to ``x_syn``, ``y_logits`` and ``lr``.
    """
    n = len(x_syn)
    b = min(batch_syn, n)
    theta = theta0.detach().requires_grad_(True)
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=generator).split(b))
        idx = chunks.pop(0).to(x_syn.device)
        xb = x_syn[idx]
        if strategies:
            xb = dsa(xb, generator, strategies)
        out = functional_call(net, layout.unflatten(theta), (xb,))
        ce = soft_cross_entropy(out, y_logits[idx])
        grad = torch.autograd.grad(ce, theta, create_graph=True)[0]
        theta = theta - lr * grad
    return theta


def matching_loss(theta_n: torch.Tensor, theta0: torch.Tensor, target: torch.Tensor,
                  alpha: float = 0.0) -> tuple[torch.Tensor, int]:
    """Normalised parameter-matching loss with Common Pattern Dropout (METHODS.md §5.3 step 3, 4.4).

    ``e = (theta_N - target)^2``, ``d = (theta0 - target)^2`` per scalar (``(P,)``); the
    ``floor(alpha P)`` smallest ``e`` are dropped and ``L = sum_keep e / sum_keep d``. With
    ``alpha = 0`` this is ``||theta_N - target||^2 / ||theta0 - target||^2``.

    Args:
        theta_n: ``(P,)`` unrolled student parameters (differentiable).
        theta0, target: ``(P,)`` expert snapshots at ``t`` and ``t+M``.
        alpha: CPD fraction in [0, 1).

    Returns:
        ``(L, dropped)``: scalar loss and the number of dropped entries.

    Raises:
        ConfigError: alpha outside [0, 1).
    """
    if not 0.0 <= alpha < 1.0:
        raise ConfigError(f"CPD alpha must be in [0, 1), got {alpha}")
    e = (theta_n - target) ** 2
    d = (theta0 - target) ** 2
    drop = int(math.floor(alpha * e.numel()))
    if drop == 0:
        return e.sum() / d.sum(), 0
    keep = torch.topk(e.detach(), e.numel() - drop, sorted=False).indices
    return e[keep].sum() / d[keep].sum(), drop


def init_from_experts(logits: torch.Tensor, c: int, ipc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which real images of class ``c`` initialise the synthetic images, and their initial label
    logits (DATM code, METHODS.md §5.3 step 1).

    The images the FINAL expert classifies correctly come first (highest true-class probability
    first); when fewer than ``ipc`` are correct (weak experts) the rest are filled with the
    misclassified images of highest true-class probability under the final expert, and a warning
    is logged. Each chosen image's initial ``Y`` is the mean of the logits of the experts that
    classify it correctly (of all experts when none does).

    Args:
        logits: ``(K, n, C)`` final-expert logits of the ``n`` candidate real images of class c.
        c: the class (an index into C).
        ipc: images to choose (capped at n).

    Returns:
        ``(order, y)``: ``(ipc,)`` indices into the n candidates and ``(ipc, C)`` logits.
    """
    correct = logits.argmax(2) == c                                          # (K, n)
    prob = logits[-1].softmax(1)[:, c]                                       # (n,) in [0, 1]
    order = torch.argsort(correct[-1].float() + prob, descending=True, stable=True)[:ipc]
    n_ok = int(correct[-1].sum())
    if n_ok < len(order):
        log.warning("class %d: the final expert classifies only %d of %d real images correctly; "
                    "also using the %d misclassified ones with the highest class-%d probability "
                    "(the experts are weak: train them longer)", c, n_ok, logits.shape[1],
                    len(order) - n_ok, c)
    w = correct[:, order].float()
    w[:, w.sum(0) == 0] = 1.0                                                # none correct: all
    return order, (logits[:, order] * w[..., None]).sum(0) / w.sum(0)[:, None]


def _mem_available(device: torch.device) -> int | None:
    """Free bytes on ``device``: CUDA ``mem_get_info``; CPU ``MemAvailable`` of /proc/meminfo."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def unroll_bytes_per_step(net: nn.Module, layout: ParamLayout, image_size: int, num_classes: int,
                          batch: int) -> int:
    """Bytes the autograd graph keeps for ONE unrolled student step on ``batch`` images: the
    unique storages saved for backward, counted with ``saved_tensors_hooks`` on a real CPU step
    (exact for this architecture and image size, device independent up to allocator rounding)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            seen[(id(t), "?")] = t.numel() * t.element_size()
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g, requires_grad=True)
    y = torch.randn(batch, num_classes, generator=g, requires_grad=True)
    lr = torch.tensor(0.01, requires_grad=True)
    theta0 = torch.randn(layout.numel, generator=g) * 0.01
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unroll_student(net.cpu(), layout, theta0, x, y, lr, 1, batch, g, None)
    return sum(seen.values())


def estimate_unroll_bytes(net: nn.Module, layout: ParamLayout, image_size: int, num_classes: int,
                          syn_steps: int, batch_syn: int, unroll: str = "plain",
                          num_images: int = 0) -> dict:
    """Memory estimate of one outer iteration (METHODS.md §5.7): linear in ``syn_steps x batch_syn``
    for the plain unroll; with ``unroll="recompute"`` one step's graph plus the stored iterates
    (:func:`nrrdd_core.unroll.recompute_bytes`; ``num_images`` = N).

    Returns:
        ``{"bytes", "per_image_step", "per_step"}``: total bytes (graph of all unrolled steps,
        plus 25 % for the backward pass and the snapshots), bytes per image-step, and the
        batch-independent bytes per step (parameter vectors and gradients).
    """
    one = unroll_bytes_per_step(net, layout, image_size, num_classes, 1)
    two = unroll_bytes_per_step(net, layout, image_size, num_classes, 2)
    per_image, per_step = max(two - one, 0), max(2 * one - two, 0)
    graph = syn_steps * (per_step + per_image * batch_syn)
    total = int(1.25 * graph + 4 * layout.numel * 4)
    if unroll == "recompute":
        total = recompute_bytes(per_step, per_image, batch_syn, syn_steps, layout.numel,
                                max(num_images, batch_syn), 3 * image_size ** 2, num_classes)
    return {"bytes": total, "per_image_step": per_image, "per_step": per_step}


# ---- the Distiller ----------------------------------------------------------------------------------

@register_method("edf")
class EDFDistiller(Distiller):
    """EDF (DATM + CPD + DAE) on the step-wise Distiller protocol (METHODS.md §5.3-4.5).

    The teacher is used as the CAM model of DAE (``cam_model="teacher"``) and for the
    dataset-compatibility check; the expert buffer (``config.buffer`` or the cached
    ``ExpertConfig()`` buffer of the dataset, trained in phase ``"experts"`` when missing)
    defines the student architecture (ConvNet-IN).

    Raises (at construction or on the first ``"match"`` step):
        CheckpointError: bad buffer. TeacherMismatchError: buffer trained on another class count
        or image size. ConfigError: T+ + M beyond the buffer's epochs. ResourceError: the
        unrolled graph would not fit the device's free memory (message has the estimate).
    """

    Config = EDFConfig

    def __init__(self, config: EDFConfig, **kwargs):
        super().__init__(config, **kwargs)
        for c in self.classes:
            self.require_images(c, self.ipc)
        self.strategies = check_strategies(config.dsa_strategies.split(",")) if config.dsa else None
        self.buffer: ExpertBuffer | None = None
        self._trainer: ExpertTrainer | None = None
        self._expert_cfg = ExpertConfig()
        self.expert_steps = 0
        if config.buffer:
            self.buffer = load_buffer(config.buffer, verify=False)
        elif (buffer_dir(self._expert_cfg, self.dataset) / MANIFEST).is_file():
            self.buffer = load_buffer(buffer_dir(self._expert_cfg, self.dataset), verify=False)
        else:
            self.expert_steps = self._expert_cfg.num_experts * self._expert_cfg.epochs
        if self.buffer is not None:
            self._check_buffer()
        self.x_syn: torch.Tensor | None = None
        self.y_logits: torch.Tensor | None = None
        self.syn_lr: torch.Tensor | None = None
        self.initial: torch.Tensor | None = None
        self.dae_map: torch.Tensor | None = None
        self._cam_teacher = None

    # ---- protocol ----------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.expert_steps + self.config.iterations

    def _step(self) -> StepRecord:
        if self.step_index < self.expert_steps:
            return self._expert_step()
        if self.x_syn is None:
            self._setup()
        return self._match_step(self.step_index - self.expert_steps)

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N,3,H,W)`` [0,1] CPU images (ZCA inverted, denormalised, clipped) and labels
        ``(N,)``: the class each image was initialised from and is distilled for, in the
        dataset's label space (``argmax Y`` may drift to another class when the experts are weak;
        the learned ``Y`` itself is in :meth:`export_extras`); empty before initialisation."""
        if self.x_syn is None:
            s = self.dataset.config.image_size
            return torch.zeros(0, 3, s, s), torch.zeros(0, dtype=torch.long)
        return self._to01(self.x_syn.detach()), self.labels.cpu()

    def views(self) -> dict[str, torch.Tensor]:
        """``initial``, ``change`` (views), ``logits`` ``(N,C)`` (learned Y), ``lr`` ``(1,)``
        (learned eta) and, after a DAE step, ``mask`` ``(N,1,H,W)`` = DAE weight / its maximum."""
        if self.x_syn is None:
            return {}
        now = self._to01(self.x_syn.detach())
        out = {"initial": self.initial, "change": (now - self.initial).abs().mean(1),
               "logits": self.y_logits.detach().cpu(), "lr": self.syn_lr.detach().cpu().view(1)}
        if self.dae_map is not None:
            out["mask"] = self.dae_map / self.dae_map.amax((1, 2, 3), keepdim=True)
        return out

    def export_extras(self) -> dict:
        """What the EDF protocol (METHODS.md §5.6) needs besides the images, stored with a saved run:
        the learned ``label_logits`` ``(N,C)`` float32 (C = the dataset's classes, image order),
        the learned student lr ``syn_lr`` (float), the ConvNet-IN ``arch_kwargs`` of the expert
        buffer and the buffer's ``zca_eps`` (None without ZCA). Empty before initialisation."""
        if self.x_syn is None:
            return {}
        zca_cfg = self.buffer.manifest["config"]
        return {"label_logits": self.y_logits.detach().cpu().float(),
                "syn_lr": float(self.syn_lr.detach()), "arch_kwargs": dict(self.buffer.arch_kwargs),
                "zca_eps": zca_cfg.get("zca_eps") if zca_cfg.get("zca") else None}

    def eval_kwargs(self) -> dict:
        """Keyword arguments for :func:`nrrdd_core.evaluate.edf.evaluate_edf`: the same as
        :meth:`export_extras` (the EDF protocol takes all of them)."""
        return self.export_extras()

    def state_dict(self) -> dict:
        s = super().state_dict()
        if self._trainer is not None:
            s["experts"] = self._trainer.state_dict()
        if self.x_syn is not None:
            s.update(copy.deepcopy({
                "x_syn": self.x_syn.detach().cpu(), "y_logits": self.y_logits.detach().cpu(),
                "syn_lr": self.syn_lr.detach().cpu(), "initial": self.initial,
                "labels": self.labels.cpu(), "opt": [o.state_dict() for o in self.opts],
                "dae_map": self.dae_map}))
        return s

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "experts" in state:
            self._ensure_trainer()
            self._trainer.load_state_dict(state["experts"])
        if "x_syn" in state:
            if self.buffer is None:
                self._load_trained_buffer()
            self._build(state["x_syn"], state["y_logits"], state["labels"], float(state["syn_lr"]))
            self.initial = state["initial"]
            self.dae_map = state.get("dae_map")
            for o, os_ in zip(self.opts, state["opt"]):
                o.load_state_dict(os_)

    def close(self) -> None:
        self._trainer = None
        self._cam_teacher = None
        if self.buffer is not None:
            self.buffer._cache = None

    # ---- experts phase -------------------------------------------------------------------------
    def _ensure_trainer(self) -> None:
        if self._trainer is None:
            self._trainer = ExpertTrainer(self._expert_cfg, self.dataset, self.device)

    def _expert_step(self) -> StepRecord:
        self._ensure_trainer()
        info = self._trainer.step() if not self._trainer.done else {}
        if self.step_index == self.expert_steps - 1:
            self._trainer.finish()
            self._load_trained_buffer()
        return StepRecord(0, 0, "experts", losses={"ce": info.get("loss", 0.0)},
                          info={k: v for k, v in info.items() if k != "loss"})

    def _load_trained_buffer(self) -> None:
        self.buffer = load_buffer(buffer_dir(self._expert_cfg, self.dataset), verify=False)
        self._check_buffer()
        self._trainer = None

    def _check_buffer(self) -> None:
        b, dc, c = self.buffer, self.dataset.config, self.config
        if b.num_classes != dc.num_classes or b.image_size != dc.image_size:
            raise TeacherMismatchError(
                f"expert buffer {b.path} was trained for {b.num_classes} classes at "
                f"{b.image_size}px, dataset has {dc.num_classes} at {dc.image_size}px")
        if c.max_start_epoch + c.expert_epochs > b.epochs:
            raise ConfigError(f"max_start_epoch + expert_epochs = {c.max_start_epoch + c.expert_epochs} "
                              f"exceeds the buffer's {b.epochs} epochs; lower max_start_epoch")

    # ---- initialisation ---------------------------------------------------------------------------
    def _setup(self) -> None:
        b = self.buffer
        self._make_net()
        self.check_memory()
        finals = [b.trajectory(i)[-1] for i in range(b.num_experts)]
        xs, ys, labels = [], [], []
        for c in self.classes:
            pool = self.real_indices(c, max(4 * self.ipc, 64))
            x = self._prepare(self.dataset.train.float01(pool))
            logits = torch.stack([self._logits(f, x) for f in finals])      # (K, n, C)
            order, y0 = init_from_experts(logits, c, self.ipc)
            ys.append(y0)
            xs.append(x[order])
            labels.append(torch.full((len(order),), c, dtype=torch.long))
        lr0 = self.config.lr_teacher or float(b.manifest["config"]["lr"])
        self._build(torch.cat(xs), torch.cat(ys), torch.cat(labels), lr0)
        self.initial = self._to01(self.x_syn.detach())

    @torch.no_grad()
    def _logits(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = self.layout.unflatten(flat.to(self.device))
        return torch.cat([functional_call(self.net, params, (x[i:i + 256].to(self.device),)).cpu()
                          for i in range(0, len(x), 256)])

    def _make_net(self) -> None:
        """The student ConvNet-IN (structure only: its own weights are never used)."""
        b, dc = self.buffer, self.dataset.config
        self.net = seeded_model(dc.num_classes, dc.image_size, b.arch_kwargs,
                                torch.Generator().manual_seed(0)).to(self.device)
        self.layout = ParamLayout(self.net)
        if self.layout.numel != b.num_params:
            raise TeacherMismatchError(f"expert buffer has {b.num_params} parameters, ConvNet-IN "
                                       f"{b.arch_kwargs} has {self.layout.numel}")

    def _build(self, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, lr: float) -> None:
        if not hasattr(self, "net"):
            self._make_net()
        c = self.config
        self.x_syn = x.to(self.device).clone().requires_grad_(True)
        self.y_logits = y.to(self.device).clone().requires_grad_(True)
        self.syn_lr = torch.tensor(float(lr), device=self.device, requires_grad=True)
        self.labels = labels
        self.opts = [torch.optim.SGD([self.x_syn], lr=c.lr_img, momentum=0.5),
                     torch.optim.SGD([self.syn_lr], lr=c.lr_lr, momentum=0.5),
                     torch.optim.SGD([self.y_logits], lr=c.lr_y, momentum=0.9)]

    def _prepare(self, x01: torch.Tensor) -> torch.Tensor:
        x = self.dataset.config.normalize(x01)
        return self.buffer.zca(x) if self.buffer.zca is not None else x

    def _unwhiten(self, x: torch.Tensor) -> torch.Tensor:
        return self.buffer.zca.invert(x) if self.buffer.zca is not None else x

    def _to01(self, x: torch.Tensor) -> torch.Tensor:
        return self.dataset.config.denormalize(self._unwhiten(x)).clamp(0, 1).cpu()

    # ---- memory ---------------------------------------------------------------------------------
    def memory_estimate(self) -> dict:
        """:func:`estimate_unroll_bytes` for this run (``batch_syn`` capped at N)."""
        c, dc = self.config, self.dataset.config
        n = len(self.classes) * self.ipc
        return estimate_unroll_bytes(self.net, self.layout, dc.image_size, dc.num_classes,
                                     c.syn_steps, min(c.batch_syn, n), c.unroll, n)

    def check_memory(self) -> dict:
        """Refuse a run whose unrolled graph would not fit (METHODS.md §5.7).

        Raises:
            ResourceError: estimate > ``memory_budget_mb`` (or the device's free memory), with
                the estimate and a suggested ``syn_steps``.
        """
        est = self.memory_estimate()
        self.net.to(self.device)
        c = self.config
        avail = int(c.memory_budget_mb * 2**20) if c.memory_budget_mb > 0 else _mem_available(self.device)
        if avail is not None and est["bytes"] > avail:
            fit = max(1, int(c.syn_steps * avail / est["bytes"]))
            raise ResourceError(
                f"EDF needs about {est['bytes'] / 2**20:.0f} MiB for syn_steps={c.syn_steps} x "
                f"batch_syn={c.batch_syn} ({est['per_image_step'] / 2**20:.2f} MiB per image-step) "
                f"but only {avail / 2**20:.0f} MiB are available on {self.device}; lower syn_steps "
                f"to about {fit} or batch_syn, use unroll=recompute (constant memory), or use a "
                f"GPU with more memory")
        log.info("EDF memory estimate %.1f MiB", est["bytes"] / 2**20)
        return est

    # ---- one outer iteration ----------------------------------------------------------------------
    def _match_step(self, it: int) -> StepRecord:
        c, b = self.config, self.buffer
        upper = c.upper_bound(it)
        e = int(torch.randint(b.num_experts, (1,), generator=self.generator))
        t = int(torch.randint(c.min_start_epoch, upper, (1,), generator=self.generator))
        traj = b.trajectory(e)
        theta0, target = traj[t].to(self.device), traj[t + c.expert_epochs].to(self.device)
        unroll = unroll_student if c.unroll == "plain" else unroll_recompute
        theta_n = unroll(self.net, self.layout, theta0, self.x_syn, self.y_logits,
                         self.syn_lr, c.syn_steps, c.batch_syn, self.generator, self.strategies)
        loss, dropped = matching_loss(theta_n, theta0, target, c.cpd_alpha)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        losses = self.check_finite({"match": loss})
        info = {"expert": e, "start_epoch": t, "upper_bound": upper, "lr": float(self.syn_lr.detach()),
                "dropped": dropped, "dae": False}
        if c.dae_beta > 0 and it % c.dae_interval == 0:
            self.dae_map = self._dae_weight().cpu()
            self.x_syn.grad.mul_(self.dae_map.to(self.device))
            info["dae"] = True
        info["skipped"] = losses["match"] > c.max_loss
        if not info["skipped"]:
            for o in self.opts:
                o.step()
        return StepRecord(0, 0, "match", losses=losses, info=info)

    def _dae_weight(self) -> torch.Tensor:
        """DAE weight ``(N,1,H,W)`` (METHODS.md §5.5) of the current images under the CAM model, class
        ``argmax Y`` (``dae_target="argmax_y"``) or the distilled class (``"distilled_class"``),
        in the dataset's label space, mapped to the CAM model's label space."""
        from ..cam import dae_weight, teacher_cam

        x = self._unwhiten(self.x_syn.detach())
        if self.config.dae_target == "argmax_y":
            targets = self.y_logits.detach().argmax(1)
        else:
            targets = self.labels.to(self.x_syn.device)
        if self.config.cam_model == "teacher":
            cam_t = self.teacher
        else:
            cam_t = self._imagenet_cam_model()
            targets = self._imagenet_targets().to(targets.device)[targets]
            s = cam_t.data_config.image_size
            x = cam_t.data_config.normalize(self.dataset.config.denormalize(x))
            x = nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        cam = teacher_cam(cam_t, x.to(cam_t.device), targets.to(cam_t.device), method=self.config.cam_method)
        h = self.dataset.config.image_size
        if cam.shape[-1] != h:
            cam = nn.functional.interpolate(cam[:, None], size=(h, h), mode="bilinear",
                                            align_corners=False)[:, 0]
        return dae_weight(cam.float().to(self.device), self.config.dae_beta)

    def _imagenet_cam_model(self):
        if self._cam_teacher is None:
            from ..models.torchvision_models import pretrained_teacher

            self._cam_teacher = pretrained_teacher("resnet18", device=self.device)
        return self._cam_teacher

    def _imagenet_targets(self) -> torch.Tensor:
        """ImageNet-1k index of each dataset label: ``bundle.source["imagenet_indices"]`` (one per
        original label) through ``bundle.class_map``.

        Raises:
            ConfigError: the dataset does not record its ImageNet class indices.
        """
        idx = self.dataset.source.get("imagenet_indices")
        if not idx:
            raise ConfigError("cam_model=imagenet_resnet18 needs an ImageNet-subset dataset (its "
                              "source must list imagenet_indices); use cam_model=teacher")
        return torch.tensor([int(idx[o]) for o in self.dataset.class_map], dtype=torch.long)
