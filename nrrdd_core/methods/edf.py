"""EDF: trajectory matching (DATM) with Common Pattern Dropout and Discriminative Area
Enhancement (METHODS.md §5.3-5.5, 5.7).

State: synthetic images ``x~ (N,3,H,W)`` (normalised pixels; ZCA-whitened when the expert
buffer was trained with ZCA), learnable label logits ``Y (N,C)`` (C = classes of the dataset)
and a learnable student learning rate ``eta``. One :meth:`EDFDistiller.step` is one outer
iteration; when no expert buffer is given and none is cached, the first steps (phase
``"experts"``) train the buffer of the ``expert_config`` argument (default: the
:class:`~nrrdd_core.experts.ExpertConfig` defaults), one expert epoch per step.

By default EDF is EDF: CPD's alpha and DAE's interval follow the IPC as in the official configs
(:data:`IPC_DEFAULTS`, :meth:`EDFConfig.for_ipc`) and DAE's beta is 1. Plain DATM is the explicit
"off" setting ``cpd_alpha=0, dae_beta=0`` (:data:`DATM`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ..cam import CAM_METHODS, dae_weight, get_cam
from ..configs import ConfigBase, param
from ..dsa import DSA_STRATEGIES, check_strategies, dsa
from ..errors import ConfigError, ResourceError, TeacherMismatchError
from ..experts import (
    MANIFEST,
    ExpertBuffer,
    ExpertConfig,
    ExpertTrainer,
    ParamLayout,
    buffer_dir,
    load_buffer,
    seeded_model,
    soft_cross_entropy,
)
from ..losses import matching_loss
from ..unroll import UNROLLS, recompute_bytes, unroll_recompute
from .base import Distiller, StepRecord, register_method

log = logging.getLogger(__name__)

#: Per-IPC settings of the official EDF configs (METHODS.md §5.4-5.5): published IPC ->
#: ``(cpd_alpha, dae_interval)``. :meth:`EDFConfig.for_ipc` uses the row of IPC 1 for IPC 1, of
#: IPC 10 for IPC 2-49 and of IPC 50 from 50 on (the in-between assignment is ours).
IPC_DEFAULTS = {1: (0.0, 50), 10: (0.25, 100), 50: (0.375, 100)}

#: Overrides that turn EDF into plain DATM (no CPD, no DAE): ``EDFConfig(**DATM)``, or
#: ``--cpd-alpha 0 --dae-beta 0`` on the command line.
DATM = {"cpd_alpha": 0.0, "dae_beta": 0.0}


@dataclass(frozen=True)
class EDFConfig(ConfigBase):
    """EDF / DATM settings (METHODS.md §5.3-5.5). CPD and DAE are on by default, with the official
    per-IPC values (``cpd_alpha=-1``, ``dae_interval=0``: resolved by :meth:`for_ipc` when a run
    starts); :data:`DATM` switches both off. The other defaults are small, for the built-in dataset
    on a CPU (the papers use syn_steps 80, batch_syn 100+ and thousands of iterations on a GPU)."""

    iterations: int = param(200, "outer iterations (one per step)", unit="steps", lo=1,
                            source="ours")
    syn_steps: int = param(8, "student SGD steps unrolled per iteration (N_syn)", unit="steps",
                           lo=1, source="ours")
    expert_epochs: int = param(2, "expert epochs the student must match (M)", unit="epochs", lo=1,
                               source="code (EDF distill/edf_distill.py)")
    min_start_epoch: int = param(0, "lowest start epoch T-", unit="epochs", lo=0,
                                 source="code (EDF distill/edf_distill.py)")
    current_max_start_epoch: int = param(4, "initial upper bound T of the start epoch",
                                         unit="epochs", lo=1,
                                         source="code (EDF distill/edf_distill.py)")
    max_start_epoch: int = param(10, "final upper bound T+ of the start epoch", unit="epochs",
                                 lo=1, source="code (EDF distill/edf_distill.py)")
    expansion_iterations: int = param(100, "iterations over which the bound rises from T to T+ "
                                      "(E_exp)", unit="steps", lo=1,
                                      source="code (EDF distill/edf_distill.py)")
    batch_syn: int = param(25, "synthetic images per unrolled step (capped at N)", unit="images",
                           lo=1, source="ours")
    lr_img: float = param(100.0, "SGD lr of the images (momentum 0.5)", lo=0.0,
                          source="code (EDF distill/edf_distill.py)")
    lr_lr: float = param(1e-5, "SGD lr of the student lr (momentum 0.5)", lo=0.0,
                         source="code (EDF distill/edf_distill.py)")
    lr_y: float = param(2.0, "SGD lr of the label logits (momentum 0.9)", lo=0.0,
                        source="code (EDF distill/edf_distill.py)")
    lr_teacher: float = param(0.0, "initial student lr eta; 0 = the experts' lr (0.01 in the "
                              "papers)", lo=0.0, source="code (EDF distill/edf_distill.py)")
    max_loss: float = param(10.0, "skip the update when the matching loss exceeds this",
                            lo=0.0, lo_open=True, source="ours")
    cpd_alpha: float = param(-1.0, "CPD: fraction alpha of the parameters with the smallest "
                             "errors dropped; -1 = by IPC (0 at IPC 1, 0.25 at IPC 10, 0.375 at "
                             "IPC 50); 0 = off; < 1", lo=-1.0,
                             source="code (EDF edf_distill.py main, loss_threshold of the configs)")
    dae_beta: float = param(1.0, "DAE: offset beta added to the CAM at or above the threshold "
                            "(1; 2 for ImageWoof); 0 = off", lo=0.0,
                            source="code (EDF edf_distill.py create_soft_mask, configs)")
    dae_interval: int = param(0, "DAE: CAM maps recomputed every k iterations, the stored weight "
                              "applied on every iteration; 0 = by IPC (50 at IPC 1, 100 at IPC 10 "
                              "and 50)", unit="steps", lo=0,
                              source="code (EDF edf_distill.py main, interval of the configs)")
    act_threshold: float = param(0.0, "DAE: CAM level from which pixels are enhanced; 0 = each "
                                 "image's mean CAM (released default), > 0 = this fixed level "
                                 "(0.5 in the CIFAR-10 IPC1000 and Tiny IPC50/100 configs)",
                                 lo=0.0, hi=1.0,
                                 source="code (EDF edf_distill.py create_soft_mask, act_threshold)")
    dae_target: str = param("argmax_y", "DAE CAM class: argmax of the learned label logits Y "
                            "(METHODS.md §5.5, released code) or the class each image is distilled for "
                            "(stable when weak experts make argmax Y drift)",
                            choices=("argmax_y", "distilled_class"),
                            source="code (EDF distill/edf_distill.py) / ours (distilled_class)")
    cam_method: str = param("gradcam_torch", "CAM family for DAE (the code uses Smooth Grad-CAM++)",
                            choices=CAM_METHODS,
                            source="code (EDF distill/edf_distill.py)")
    cam_model: str = param("teacher", "CAM model: the dataset's teacher, or an ImageNet ResNet-18 "
                           "(ImageNet subsets; class index mapped to ImageNet)",
                           choices=("teacher", "imagenet_resnet18"),
                           source="code (EDF distill/edf_distill.py)")
    dsa: bool = param(True, "DSA on the synthetic mini-batches",
                      source="code (EDF distill/edf_distill.py, DSA DiffAugment)")
    dsa_strategies: str = param(",".join(DSA_STRATEGIES), "comma-separated DSA strategies",
                                source="code (EDF distill/edf_distill.py, DSA DiffAugment)",
                                ui=False)
    buffer: str = param("", "expert buffer folder; empty = train/reuse ExpertConfig defaults",
                        source="ours", ui=False)
    memory_budget_mb: float = param(0.0, "memory the unrolled graph may use; 0 = free device "
                                    "memory", unit="MiB", lo=0.0, source="ours", ui=False)
    unroll: str = param("plain", "student unroll: plain (graph of all syn_steps kept, memory grows "
                        "with syn_steps) or recompute (each step recomputed in the backward pass: "
                        "same gradients, constant graph memory, about 2x the time)",
                        choices=UNROLLS, source="ours (TESLA)")

    def validate(self) -> None:
        """Ranges, plus: CPD alpha in [0, 1) or -1 (by IPC), T- < T <= T+, valid DSA strategies.

        Raises:
            ConfigError: naming the field.
        """
        if self.cpd_alpha >= 1.0:
            raise ConfigError(f"cpd_alpha={self.cpd_alpha}: CPD drops floor(alpha*P) of the P "
                              "parameter errors, so alpha >= 1 drops all of them and the loss is "
                              "0/0 (the released default 1.0 gives NaN); use 0 <= alpha < 1")
        super().validate()
        if self.cpd_alpha < 0 and self.cpd_alpha != -1.0:
            raise ConfigError(f"cpd_alpha={self.cpd_alpha}: use 0 <= alpha < 1, or -1 for the "
                              "official value of the IPC")
        if not self.min_start_epoch < self.current_max_start_epoch <= self.max_start_epoch:
            raise ConfigError("start epochs must satisfy min_start_epoch < current_max_start_epoch "
                              f"<= max_start_epoch; got {self.min_start_epoch}, "
                              f"{self.current_max_start_epoch}, {self.max_start_epoch}")
        check_strategies(self.dsa_strategies.split(","))

    def for_ipc(self, ipc: int) -> EDFConfig:
        """This config with the by-IPC settings resolved (``cpd_alpha=-1`` and ``dae_interval=0``
        replaced by :data:`IPC_DEFAULTS`); explicit values are kept."""
        row = IPC_DEFAULTS[1 if ipc <= 1 else 10 if ipc < 50 else 50]
        return self.replace(cpd_alpha=row[0] if self.cpd_alpha < 0 else self.cpd_alpha,
                            dae_interval=self.dae_interval or row[1])

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
                   generator: torch.Generator, strategies: tuple[str, ...] | None, *,
                   batches: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Unroll ``syn_steps`` SGD steps of the student from ``theta0`` (METHODS.md §5.3 step 2).

    Each step takes the next ``batch_syn`` indices of a random permutation of the N images
    (refilled when used up, MTT code; or the given ``batches``), applies DSA (when
    ``strategies``), computes the soft
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
        batches: optional ``syn_steps`` index tensors, one per step, used instead of the drawn
            permutations (to replay fixed mini-batches, e.g. the official code's).

    Returns:
        ``theta_N`` ``(P,)``, differentiable with respect to ``x_syn``, ``y_logits`` and ``lr``.
    """
    n = len(x_syn)
    b = min(batch_syn, n)
    theta = theta0.detach().requires_grad_(True)
    chunks: list[torch.Tensor] = []
    for step in range(syn_steps):
        if batches is None and not chunks:
            chunks = list(torch.randperm(n, generator=generator).split(b))
        idx = (torch.as_tensor(batches[step]) if batches is not None else chunks.pop(0)).to(x_syn.device)
        xb = x_syn[idx]
        if strategies:
            xb = dsa(xb, generator, strategies)
        out = functional_call(net, layout.unflatten(theta), (xb,))
        ce = soft_cross_entropy(out, y_logits[idx])
        grad = torch.autograd.grad(ce, theta, create_graph=True)[0]
        theta = theta - lr * grad
    return theta


def init_from_experts(logits: torch.Tensor, c: int, ipc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which real images of class ``c`` initialise the synthetic images, and their initial label
    logits (DATM / EDF code, ``pix_init="samples_predicted_correctly"``; METHODS.md §5.3 step 1).

    The candidates are the class's real images in the run's seeded random order over the whole
    class. The first ``ipc`` of them that the FINAL expert (last expert, last snapshot)
    classifies correctly are chosen, in that order (no preference for confident images). When
    fewer than ``ipc`` are correct (weak experts) the first misclassified ones, in the same
    order, fill the rest and a warning is logged (ours: the released code moves on to the next
    expert). Each chosen image's initial ``Y`` is the mean of the logits of the experts that
    classify it correctly (of all experts when none does).

    Args:
        logits: ``(K, n, C)`` final-snapshot logits of the K experts on the ``n`` candidates, in
            the random order.
        c: the class (an index into C).
        ipc: images to choose (capped at n).

    Returns:
        ``(order, y)``: ``(ipc,)`` indices into the n candidates and ``(ipc, C)`` logits.
    """
    correct = logits.argmax(2) == c                                          # (K, n)
    pos = torch.arange(logits.shape[1])
    order = torch.cat([pos[correct[-1]], pos[~correct[-1]]])[:ipc]
    n_ok = int(correct[-1].sum())
    if n_ok < len(order):
        log.warning("class %d: the final expert classifies only %d of %d real images correctly; "
                    "also using the first %d misclassified ones (the experts are weak: train "
                    "them longer)", c, n_ok, logits.shape[1], len(order) - n_ok)
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
    (exact for this architecture and image size, device independent up to allocator rounding).
    ``net`` itself is left where it is (an uninitialised CPU copy of its structure is measured)."""
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
        unroll_student(copy.deepcopy(net).to_empty(device="cpu"), layout, theta0, x, y, lr, 1, batch,
                       g, None)
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
    """EDF (DATM + CPD + DAE) on the step-wise Distiller protocol (METHODS.md §5.3-5.5).

    The teacher is used as the CAM model of DAE (``cam_model="teacher"``) and for the
    dataset-compatibility check; the expert buffer (``config.buffer``, or the cached buffer of
    ``expert_config`` on the dataset, trained in phase ``"experts"`` when missing) defines the
    student architecture (ConvNet-IN). The config's by-IPC settings are resolved at construction
    (:meth:`EDFConfig.for_ipc`; ``self.config`` holds the resolved values).

    Args (besides the :class:`~nrrdd_core.methods.base.Distiller` ones):
        expert_config: how to train / find the expert buffer when ``config.buffer`` is empty
            (default :class:`~nrrdd_core.experts.ExpertConfig` defaults).
        cam_fn: the CAM of DAE, ``cam_fn(cam_model, x_norm, targets) -> (N,h,w)`` in [0,1]
            (``x_norm`` normalised for ``cam_model``, ``targets`` in its label space); default
            ``get_cam(config.cam_method)(cam_model).attribute(x_norm, targets)``.

    Raises (at construction or on the first ``"match"`` step):
        CheckpointError: bad buffer. TeacherMismatchError: buffer trained on another class count
        or image size. ConfigError: T+ + M beyond the buffer's epochs. ResourceError: the
        unrolled graph would not fit the device's free memory (message has the estimate).
    """

    Config = EDFConfig

    def __init__(self, config: EDFConfig, *, expert_config: ExpertConfig | None = None,
                 cam_fn: Callable[[object, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 **kwargs):
        super().__init__(config, **kwargs)
        self.config = cfg = config.for_ipc(self.ipc)
        for c in self.classes:
            self.require_images(c, self.ipc)
        self.strategies = check_strategies(cfg.dsa_strategies.split(",")) if cfg.dsa else None
        self.cam_fn = cam_fn or self._default_cam
        self.buffer: ExpertBuffer | None = None
        self._trainer: ExpertTrainer | None = None
        self._expert_cfg = expert_config or ExpertConfig()
        self.expert_steps = 0
        if cfg.buffer:
            self.buffer = load_buffer(cfg.buffer, verify=False)
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
        the learned ``Y`` and the unclipped float images are in :meth:`export_extras`); empty
        before initialisation."""
        if self.x_syn is None:
            s = self.dataset.config.image_size
            return torch.zeros(0, 3, s, s), torch.zeros(0, dtype=torch.long)
        return self._to01(self.x_syn.detach()), self.labels.cpu()

    def views(self) -> dict[str, torch.Tensor]:
        """``initial``, ``change`` (views), ``logits`` ``(N,C)`` (learned Y), ``lr`` ``(1,)``
        (learned eta) and, once DAE has run, ``mask`` ``(N,1,H,W)`` = DAE weight / its maximum."""
        if self.x_syn is None:
            return {}
        now = self._to01(self.x_syn.detach())
        out = {"initial": self.initial, "change": (now - self.initial).abs().mean(1),
               "logits": self.y_logits.detach().cpu(), "lr": self.syn_lr.detach().cpu().view(1)}
        if self.dae_map is not None:
            m = self.dae_map.cpu()
            out["mask"] = m / m.amax((1, 2, 3), keepdim=True)
        return out

    def export_extras(self) -> dict:
        """What the EDF protocol (METHODS.md §5.6) needs besides the images, stored with a saved run:
        ``images_float`` ``(N,3,H,W)`` float32, the distilled images in the space they were
        optimised in (normalised with the dataset's mean/std, ZCA-whitened when the buffer uses
        ZCA; neither clipped nor rounded to 8 bits like the PNGs), the learned ``label_logits``
        ``(N,C)`` float32 (C = the dataset's classes, image order), the learned student lr
        ``syn_lr`` (float), the ConvNet-IN ``arch_kwargs`` of the expert buffer and the buffer's
        ``zca_eps`` (None without ZCA). Empty before initialisation."""
        if self.x_syn is None:
            return {}
        zca_cfg = self.buffer.manifest["config"]
        return {"images_float": self.x_syn.detach().cpu().float().clone(),
                "label_logits": self.y_logits.detach().cpu().float(),
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
                "dae_map": self.dae_map.cpu() if self.dae_map is not None else None}))
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
            dae_map = state.get("dae_map")
            self.dae_map = dae_map.to(self.device) if dae_map is not None else None
            for o, os_ in zip(self.opts, state["opt"]):
                o.load_state_dict(os_)

    def close(self) -> None:
        self._trainer = None
        self._cam_teacher = None
        if self.buffer is not None:
            self.buffer.release()

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
        b, dc, cfg = self.buffer, self.dataset.config, self.config
        if b.num_classes != dc.num_classes or b.image_size != dc.image_size:
            raise TeacherMismatchError(
                f"expert buffer {b.path} was trained for {b.num_classes} classes at "
                f"{b.image_size}px, dataset has {dc.num_classes} at {dc.image_size}px")
        if cfg.max_start_epoch + cfg.expert_epochs > b.epochs:
            raise ConfigError(f"max_start_epoch + expert_epochs = {cfg.max_start_epoch + cfg.expert_epochs} "
                              f"exceeds the buffer's {b.epochs} epochs; lower max_start_epoch")

    # ---- initialisation ---------------------------------------------------------------------------
    def _setup(self) -> None:
        """Initial images, label logits and lr (METHODS.md §5.3 step 1, :func:`init_from_experts`)."""
        b = self.buffer
        self._make_net()
        self.check_memory()
        finals = [b.trajectory(i)[-1] for i in range(b.num_experts)]
        xs, ys, labels = [], [], []
        for c in self.classes:
            x = self._init_candidates(c, finals[-1])
            logits = torch.stack([self._logits(f, x) for f in finals])      # (K, n, C)
            order, y0 = init_from_experts(logits, c, self.ipc)
            ys.append(y0)
            xs.append(x[order])
            labels.append(torch.full((len(order),), c, dtype=torch.long))
        lr0 = self.config.lr_teacher or float(b.manifest["config"]["lr"])
        self._build(torch.cat(xs), torch.cat(ys), torch.cat(labels), lr0)
        self.initial = self._to01(self.x_syn.detach())

    def _init_candidates(self, c: int, final: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Real images of class ``c`` (normalised, ZCA-whitened when the buffer is) in a seeded
        random order over the whole class, read in chunks of ``chunk`` until the final expert
        ``final`` ``(P,)`` classifies ``ipc`` of them correctly (all of them if it never does):
        the candidates of :func:`init_from_experts`, ``(n,3,H,W)``."""
        idx = self.real_indices(c, len(self.dataset.train.indices_of(c)))
        xs, n_ok = [], 0
        for i in range(0, len(idx), chunk):
            xs.append(self._prepare(self.dataset.train.float01(idx[i:i + chunk])))
            n_ok += int((self._logits(final, xs[-1]).argmax(1) == c).sum())
            if n_ok >= self.ipc:
                break
        return torch.cat(xs)

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
        """Set the learnable state: images ``x`` ``(N,3,H,W)`` (normalised, ZCA space), label
        logits ``y`` ``(N,C)``, the distilled classes ``labels`` ``(N,)`` and the student lr,
        with fresh optimisers (METHODS.md §5.3 step 4)."""
        if not hasattr(self, "net"):
            self._make_net()
        cfg = self.config
        self.x_syn = x.to(self.device).clone().requires_grad_(True)
        self.y_logits = y.to(self.device).clone().requires_grad_(True)
        self.syn_lr = torch.tensor(float(lr), device=self.device, requires_grad=True)
        self.labels = labels
        self.dae_map = None
        self.opts = [torch.optim.SGD([self.x_syn], lr=cfg.lr_img, momentum=0.5),
                     torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=0.5),
                     torch.optim.SGD([self.y_logits], lr=cfg.lr_y, momentum=0.9)]

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
        cfg, dc = self.config, self.dataset.config
        n = len(self.classes) * self.ipc
        return estimate_unroll_bytes(self.net, self.layout, dc.image_size, dc.num_classes,
                                     cfg.syn_steps, min(cfg.batch_syn, n), cfg.unroll, n)

    def check_memory(self) -> dict:
        """Refuse a run whose unrolled graph would not fit (METHODS.md §5.7).

        Raises:
            ResourceError: estimate > ``memory_budget_mb`` (or the device's free memory), with
                the estimate and a suggested ``syn_steps``.
        """
        est = self.memory_estimate()
        cfg = self.config
        avail = int(cfg.memory_budget_mb * 2**20) if cfg.memory_budget_mb > 0 else _mem_available(self.device)
        if avail is not None and est["bytes"] > avail:
            fit = max(1, int(cfg.syn_steps * avail / est["bytes"]))
            raise ResourceError(
                f"EDF needs about {est['bytes'] / 2**20:.0f} MiB for syn_steps={cfg.syn_steps} x "
                f"batch_syn={cfg.batch_syn} ({est['per_image_step'] / 2**20:.2f} MiB per image-step) "
                f"but only {avail / 2**20:.0f} MiB are available on {self.device}; lower syn_steps "
                f"to about {fit} or batch_syn, use unroll=recompute (constant memory), or use a "
                f"GPU with more memory")
        log.info("EDF memory estimate %.1f MiB", est["bytes"] / 2**20)
        return est

    # ---- one outer iteration ----------------------------------------------------------------------
    def _match_step(self, it: int) -> StepRecord:
        cfg, b = self.config, self.buffer
        upper = cfg.upper_bound(it)
        e = int(torch.randint(b.num_experts, (1,), generator=self.generator))
        t = int(torch.randint(cfg.min_start_epoch, upper, (1,), generator=self.generator))
        traj = b.trajectory(e)
        rec = self.match_iteration(it, traj[t], traj[t + cfg.expert_epochs])
        rec.info = {"expert": e, "start_epoch": t, "upper_bound": upper, **rec.info}
        return rec

    def match_iteration(self, it: int, theta0: torch.Tensor, target: torch.Tensor,
                        batches: Sequence[torch.Tensor] | None = None) -> StepRecord:
        """One outer iteration from the expert snapshots ``theta0`` (epoch t) and ``target``
        (epoch t+M), both ``(P,)`` (METHODS.md §5.3 steps 2-4, §5.4, §5.5).

        Unrolls the student (:func:`unroll_student`, or the constant-memory unroll), computes the
        CPD matching loss (:func:`matching_loss`, ``cpd_alpha``) and backpropagates it. DAE
        (``dae_beta > 0``): the CAM maps are recomputed when ``it % dae_interval == 0`` (or when
        there are none yet) and the stored weight ``F`` multiplies the image gradient on EVERY
        iteration (released code). Then the three SGD steps, unless the loss exceeds
        ``max_loss``. ``batches`` replays fixed mini-batches (plain unroll only).

        Returns:
            the :class:`StepRecord` (``losses["match"]``; ``info``: lr, dropped, dae (weight
            applied), dae_recomputed, skipped).

        Raises:
            NonFiniteLossError: NaN/inf loss. ConfigError: ``batches`` with the recompute unroll.
        """
        cfg = self.config
        theta0, target = theta0.to(self.device), target.to(self.device)
        if batches is not None and cfg.unroll != "plain":
            raise ConfigError("fixed mini-batches need unroll=plain")
        args = (self.net, self.layout, theta0, self.x_syn, self.y_logits, self.syn_lr,
                cfg.syn_steps, cfg.batch_syn, self.generator, self.strategies)
        if cfg.unroll == "plain":
            theta_n = unroll_student(*args, batches=batches)
        else:
            theta_n = unroll_recompute(*args)
        loss, dropped = matching_loss(theta_n, theta0, target, cfg.cpd_alpha)
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        losses = self.check_finite({"match": loss})
        info = {"lr": float(self.syn_lr.detach()), "dropped": dropped, "dae": False,
                "dae_recomputed": False}
        if cfg.dae_beta > 0:
            if self.dae_map is None or it % cfg.dae_interval == 0:
                self.dae_map = self._dae_weight()
                info["dae_recomputed"] = True
            self.x_syn.grad.mul_(self.dae_map)
            info["dae"] = True
        info["skipped"] = losses["match"] > cfg.max_loss
        if not info["skipped"]:
            for o in self.opts:
                o.step()
        return StepRecord(0, 0, "match", losses=losses, info=info)

    def _dae_weight(self) -> torch.Tensor:
        """DAE weight ``(N,1,H,W)`` on the run's device (METHODS.md §5.5) of the current images
        under the CAM model, class ``argmax Y`` (``dae_target="argmax_y"``) or the distilled class
        (``"distilled_class"``), in the dataset's label space, mapped to the CAM model's label
        space; threshold ``act_threshold`` (0 = per-image mean)."""
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
        cam = self.cam_fn(cam_t, x.to(cam_t.device), targets.to(cam_t.device))
        h = self.dataset.config.image_size
        if cam.shape[-1] != h:
            cam = nn.functional.interpolate(cam[:, None], size=(h, h), mode="bilinear",
                                            align_corners=False)[:, 0]
        return dae_weight(cam.float().to(self.device), self.config.dae_beta,
                          self.config.act_threshold)

    def _default_cam(self, cam_model, x_norm: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``config.cam_method`` of :mod:`nrrdd_core.cam` on ``cam_model``'s CAM layer."""
        return get_cam(self.config.cam_method)(cam_model).attribute(x_norm, targets)

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
