"""Class activation maps (CAM) and the masks and scores built on them.

* :func:`classic_cam`: CAM of Zhou et al. 2016 (METHODS.md §4.1, NRR-DD Eq. 1), GAP or flatten classifier.
* :func:`grad_cam`: torch-native batched Grad-CAM that stays on the device (used inside
  optimisation loops: NRR-DD masks, EDF's DAE); equals ``pytorch_grad_cam.GradCAM``.
* :func:`explore_cam`: every method of :data:`CAM_METHODS` (the grad-cam package's GradCAM,
  GradCAM++, XGradCAM, ScoreCAM, LayerCAM, EigenCAM), side effects contained (for the explorer).
* :func:`noncritical_mask` (METHODS.md §4.3 Eq. 4), :func:`dae_weight` (METHODS.md §5.5),
  :func:`complexity_score` (METHODS.md §7), :func:`cam_ratio` (METHODS.md §4.2), :func:`overlay` (display).

Conventions: ``x_norm`` are normalised images ``(N,3,H,W)``; ``targets`` holds one class index per
image (int64 ``(N,)``; a single index for a whole batch is refused); CAM maps are ``(N,H,W)``
float in [0,1], min-max normalised per image (so a threshold is relative to each image), and a
constant map becomes all zeros. Every CAM function computes with the model in eval mode and
restores each module's train/eval mode, each parameter's ``requires_grad`` and ``.grad``, and
removes its hooks, also after an exception.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

CAM_METHODS = ("cam", "gradcam_torch", "gradcam", "gradcam++", "xgradcam", "scorecam",
               "layercam", "eigencam")
"""Names accepted by :func:`explore_cam` (``"cam"`` and ``"gradcam_torch"`` are ours, the rest
the grad-cam package's classes)."""

MASK_MODES = ("soft", "binary", "scaled")
COLORMAPS = {"jet": cv2.COLORMAP_JET, "viridis": cv2.COLORMAP_VIRIDIS,
             "inferno": cv2.COLORMAP_INFERNO, "turbo": cv2.COLORMAP_TURBO, "hot": cv2.COLORMAP_HOT}

_EPS = 1e-7  # the grad-cam package's normalisation epsilon: (c - min) / (max - min + eps)


# ----------------------------------------------------------------------------- helpers

def _minmax(cam: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of ``(N,h,w)`` as the grad-cam package does it
    (``scale_cam_image``): a constant map gives zeros."""
    flat = cam.flatten(1)
    c = cam - flat.min(1).values[:, None, None]
    return c / (c.flatten(1).max(1).values[:, None, None] + _EPS)


def _resize(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel centres, as cv2 INTER_LINEAR) resize of ``(N,h,w)`` to ``size``."""
    if tuple(cam.shape[-2:]) == tuple(size):
        return cam
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _check_targets(targets, n: int, device: torch.device, num_classes: int | None = None) -> torch.Tensor:
    """``targets`` as int64 ``(n,)`` on ``device``; refuses one index for a whole batch."""
    t = torch.as_tensor(targets).to(device=device, dtype=torch.int64)
    if t.shape != (n,):
        raise ConfigError(f"CAM needs one target class per image: got targets of shape "
                          f"{tuple(t.shape)} for {n} images")
    if num_classes is not None and n and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ConfigError(f"CAM target classes must lie in [0, {num_classes - 1}], "
                          f"got {int(t.min())}..{int(t.max())}")
    return t


@contextmanager
def _contained(model: nn.Module, freeze: bool) -> Iterator[None]:
    """Run ``model`` in eval mode (and with frozen parameters when ``freeze``), then restore every
    module's mode and every parameter's ``requires_grad`` and ``.grad``, also after an exception."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _, _ in params:
            p.grad = None
            if freeze:
                p.requires_grad_(False)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad


@contextmanager
def _capture(layer: nn.Module, leaf: bool = False) -> Iterator[dict]:
    """Forward hook storing ``layer``'s output in ``store["act"]`` (removed on exit).

    With ``leaf`` the output is replaced by a detached copy that requires grad, so that
    ``torch.autograd.grad`` w.r.t. it works for a frozen model and touches no parameter.
    """
    store: dict = {}

    def hook(module, inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            raise ConfigError(f"CAM layer {type(module).__name__} must output a (N,K,h,w) tensor: "
                              "pick a convolutional block")
        if leaf:
            output = output.detach().requires_grad_(True)
        store["act"] = output
        return output if leaf else None

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- CAMs

def find_classifier(model: nn.Module) -> nn.Linear:
    """The last :class:`torch.nn.Linear` of ``model`` in module order (its classifier).

    Raises:
        ConfigError: the model has no ``nn.Linear``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("classic CAM needs a model whose classifier is an nn.Linear: "
                          "use Grad-CAM for this model")
    return linears[-1]


def classic_cam(model: nn.Module, x_norm: torch.Tensor, targets, layer: nn.Module,
                fc: nn.Linear | None = None) -> torch.Tensor:
    """CAM (Zhou et al. 2016; METHODS.md §4.1, NRR-DD Eq. 1): ``CAM_y = sum_k W_fc[y,k] f_k``.

    ``f`` = output ``(N,K,h,w)`` of ``layer``. If the classifier takes ``K`` inputs (global average
    pooling nets) the weights are ``W_fc[y]``; if it takes ``K*h*w`` (flatten nets such as
    ConvNet) the per-location decomposition ``W_fc[y].view(K,h,w)`` is used. Then ReLU, bilinear
    upsampling (``align_corners=False``) to ``(H,W)`` and per-image min-max normalisation [ours].
    The bias is left out (it does not change a normalised map). On a GAP network this equals
    normalised Grad-CAM.

    Args:
        model: classifier taking normalised images; evaluated in eval mode (modes restored).
        x_norm: normalised images ``(N,3,H,W)`` on the model's device.
        targets: class index per image, int ``(N,)`` (the ground-truth class).
        layer: the module inside ``model`` whose output is the last feature map.
        fc: the classifier (default :func:`find_classifier`).

    Returns:
        ``(N,H,W)`` float in [0,1] on ``x_norm``'s device (no autograd graph).

    Raises:
        ConfigError: targets not one per image or out of range; the classifier's input size fits
            neither ``K`` nor ``K*h*w`` (pick the layer right before pooling / flatten); the layer
            does not output a 4-D tensor.
    """
    fc = fc if fc is not None else find_classifier(model)
    t = _check_targets(targets, len(x_norm), x_norm.device, fc.out_features)
    with torch.no_grad(), _contained(model, freeze=False), _capture(layer) as store:
        model(x_norm)
        f = store["act"]
        n, k, h, w = f.shape
        weight = fc.weight[t].to(f.dtype)
        if fc.in_features == k:
            cam = torch.einsum("nk,nkhw->nhw", weight, f)
        elif fc.in_features == k * h * w:
            cam = (weight.view(n, k, h, w) * f).sum(1)
        else:
            raise ConfigError(f"classifier takes {fc.in_features} inputs but the CAM layer gives "
                              f"{k}x{h}x{w}: pick the layer right before pooling/flatten")
        return _minmax(_resize(cam.clamp_min(0), tuple(x_norm.shape[-2:])))


def grad_cam(model: nn.Module, x_norm: torch.Tensor, targets, layer: nn.Module,
             raw: bool = False) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017), batched, torch-native, on ``x_norm``'s device.

    ``w_k = mean_{i,j} d logit_y / d A_k[i,j]``, ``cam = ReLU(sum_k w_k A_k)`` with ``A = layer``
    output. Then, as ``pytorch_grad_cam.GradCAM``: min-max normalise per image, resize bilinearly
    (half-pixel centres, as cv2 INTER_LINEAR) to ``(H,W)``, min-max normalise again; the result
    matches the package within 1e-4. Gradients are taken w.r.t. the captured activation only
    (``torch.autograd.grad``): no parameter ``.grad`` is filled, ``x_norm.grad`` is untouched, it
    works for a frozen teacher and inside an outer ``torch.no_grad()``.

    Args:
        model: classifier taking normalised images; evaluated in eval mode (modes restored).
        x_norm: normalised images ``(N,3,H,W)`` on the model's device (may require grad).
        targets: class index per image, int ``(N,)``.
        layer: module inside ``model`` giving ``(N,K,h,w)``.
        raw: return the unnormalised ReLU'd map ``(N,h,w)`` instead.

    Returns:
        ``(N,H,W)`` float in [0,1] (or ``(N,h,w)`` >= 0 with ``raw``), detached, on
        ``x_norm``'s device.

    Raises:
        ConfigError: targets not one per image or out of range; bad layer output.
    """
    t = _check_targets(targets, len(x_norm), x_norm.device)
    with torch.enable_grad(), _contained(model, freeze=True), _capture(layer, leaf=True) as store:
        logits = model(x_norm.detach())
        t = _check_targets(t, len(x_norm), x_norm.device, logits.shape[1])
        act = store["act"]
        grads, = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), act)
    cam = (grads.mean((2, 3))[:, :, None, None] * act.detach()).sum(1).clamp_min(0)
    if raw:
        return cam
    return _minmax(_resize(_minmax(cam), tuple(x_norm.shape[-2:])))


def _package_class(method: str):
    import pytorch_grad_cam as pgc

    return {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
            "scorecam": pgc.ScoreCAM, "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM}[method]


def explore_cam(method: str, model: nn.Module, x_norm: torch.Tensor, targets,
                layer: nn.Module) -> torch.Tensor:
    """CAM of ``method`` (one of :data:`CAM_METHODS`) for the explorer.

    ``"cam"`` and ``"gradcam_torch"`` call :func:`classic_cam` / :func:`grad_cam`; the others run the
    grad-cam package (``with Cls(model=..., target_layers=[layer])`` and one
    ``ClassifierOutputTarget`` per image) under ``torch.enable_grad()`` on a copy of the input
    that requires grad, with the parameters frozen for the call. The package's side effects are
    contained: module modes, ``requires_grad`` and ``.grad`` are restored and its hooks released,
    also after an exception. EigenCAM ignores the target class; ScoreCAM costs one forward per
    channel per image (seconds per image on a CPU).

    Args:
        method: name in :data:`CAM_METHODS`.
        model, x_norm, targets, layer: as :func:`grad_cam`.

    Returns:
        ``(N,H,W)`` float32 tensor in [0,1] on the CPU.

    Raises:
        ConfigError: unknown method, targets not one per image or out of range.
        RuntimeError: the grad-cam package failed (message says which method).
    """
    if method not in CAM_METHODS:
        raise ConfigError(f"unknown CAM method {method!r}: choose one of {', '.join(CAM_METHODS)}")
    if method == "cam":
        return classic_cam(model, x_norm, targets, layer).cpu()
    if method == "gradcam_torch":
        return grad_cam(model, x_norm, targets, layer).cpu()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    t = _check_targets(targets, len(x_norm), torch.device("cpu"))
    cls = _package_class(method)
    with torch.enable_grad(), _contained(model, freeze=True):
        x = x_norm.detach().clone().requires_grad_(True)
        with cls(model=model, target_layers=[layer]) as cam:
            try:
                out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
            except IndexError as exc:  # the package's __exit__ would swallow (and print) it
                raise RuntimeError(f"{method} failed: {exc}") from exc
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).clamp_(0, 1)


def teacher_cam(teacher, x_norm: torch.Tensor, targets, method: str = "cam",
                layer: str | None = None) -> torch.Tensor:
    """CAM of a :class:`nrrdd_core.models.teacher.Teacher` on its CAM layer (or ``layer``).

    Args:
        teacher: the Teacher (uses ``teacher.model`` and ``teacher.layer(layer)``).
        x_norm: normalised images ``(N,3,S,S)`` on the teacher's device.
        targets: class index per image ``(N,)``.
        method: name in :data:`CAM_METHODS` (default ``"cam"``, METHODS.md §4.1).
        layer: dotted module name; default the teacher's ``cam_layer``.

    Returns:
        ``(N,S,S)`` float in [0,1] on ``x_norm``'s device.

    Raises:
        ConfigError: as :func:`explore_cam`. KeyError: no such layer.
    """
    if method == "cam":
        return classic_cam(teacher.model, x_norm, targets, teacher.layer(layer))
    if method == "gradcam_torch":
        return grad_cam(teacher.model, x_norm, targets, teacher.layer(layer))
    return explore_cam(method, teacher.model, x_norm, targets, teacher.layer(layer)).to(x_norm.device)


# ----------------------------------------------------------------------------- masks and scores

def noncritical_mask(cam: torch.Tensor, tau: float, mode: str = "soft") -> torch.Tensor:
    """Non-critical region mask of NRR-DD (METHODS.md §4.3, Eq. 4).

    ``soft``: ``M = max(0, tau - C)``; ``binary``: ``M = 1[C < tau]``; ``scaled``:
    ``M = max(0, tau - C) / tau`` (all zeros when ``tau = 0``). Pixels with ``C >= tau`` are
    critical: ``M = 0`` there, so they are frozen during refinement.

    Args:
        cam: CAM ``(N,H,W)`` in [0,1].
        tau: threshold in [0,1] (paper default 0.5).
        mode: ``"soft"`` (default), ``"binary"`` or ``"scaled"``.

    Returns:
        ``(N,1,H,W)`` float mask in [0,1] (``soft``: in [0, tau]), same device and dtype as ``cam``;
        broadcasts over the colour channels.

    Raises:
        ConfigError: ``tau`` outside [0,1] or unknown ``mode``.
    """
    if not 0.0 <= float(tau) <= 1.0:
        raise ConfigError(f"tau must lie in [0, 1], got {tau}")
    if mode not in MASK_MODES:
        raise ConfigError(f"unknown mask mode {mode!r}: choose one of {', '.join(MASK_MODES)}")
    c = cam[:, None]
    if mode == "binary":
        return (c < tau).to(cam.dtype)
    m = (tau - c).clamp_min(0)
    if mode == "scaled":
        return m / tau if tau > 0 else torch.zeros_like(m)
    return m


def dae_weight(cam: torch.Tensor, beta: float) -> torch.Tensor:
    """EDF's discriminative area enhancement weight (METHODS.md §5.5).

    ``F = 1`` where ``A < mean(A)`` of its image, else ``A + beta``; used as ``x.grad *= F``.

    Args:
        cam: Grad-CAM-family map ``(N,H,W)`` in [0,1].
        beta: enhancement offset (1; 2 for ImageWoof).

    Returns:
        ``(N,1,H,W)`` weights >= 1 (for ``beta >= 1``), same device and dtype as ``cam``.
    """
    mean = cam.mean((1, 2), keepdim=True)
    return torch.where(cam < mean, torch.ones_like(cam), cam + beta)[:, None]


def complexity_score(cam: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Comp-DD complexity of each image (METHODS.md §7): ``1 - mean(1[A >= threshold])``.

    Args:
        cam: Grad-CAM map ``(N,H,W)`` in [0,1].
        threshold: activation level counted as "covered" (0.5).

    Returns:
        ``(N,)`` float in [0,1]; a class's score is the mean over its images.
    """
    return 1.0 - (cam >= threshold).float().mean((1, 2))


def cam_ratio(cam: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """CAM mass inside each box (METHODS.md §4.2, CIDD): ``sum_box C / sum_all C``.

    Args:
        cam: one image's CAM ``(H,W)`` in [0,1].
        boxes: int ``(K,4)`` boxes ``(i, j, h, w)`` in pixels (top row, left column, height, width).

    Returns:
        ``(K,)`` float in [0,1] on ``cam``'s device (all zeros when the map is all zero).
    """
    c = cam.double()
    integral = F.pad(c.cumsum(0).cumsum(1), (1, 0, 1, 0))
    b = torch.as_tensor(boxes, device=cam.device).long()
    i, j, h, w = b.unbind(1)
    inside = (integral[i + h, j + w] - integral[i, j + w] - integral[i + h, j] + integral[i, j])
    total = c.sum()
    if total <= 0:
        return torch.zeros(len(b), dtype=cam.dtype, device=cam.device)
    return (inside / total).clamp(0, 1).to(cam.dtype)


def overlay(img01, cam, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Heat-map overlay of a CAM on its image (for display): the grad-cam package's
    ``show_cam_on_image(img, cam, use_rgb=True, colormap, image_weight=1 - alpha)`` (same bytes),
    written with OpenCV alone because importing that package takes seconds (matplotlib, scipy,
    torchvision).

    Args:
        img01: image in [0,1] pixels, ``(3,H,W)`` or ``(H,W,3)`` (tensor or array).
        cam: map ``(H,W)`` in [0,1] (tensor or array).
        alpha: opacity of the heat map in [0,1] (``image_weight = 1 - alpha``).
        colormap: ``"jet"``, ``"viridis"``, ``"inferno"``, ``"turbo"`` or ``"hot"``.

    Returns:
        RGB ``uint8`` array ``(H,W,3)``.

    Raises:
        ConfigError: ``alpha`` outside [0,1], unknown colormap, or image / map sizes disagree.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"overlay alpha must lie in [0, 1], got {alpha}")
    if colormap not in COLORMAPS:
        raise ConfigError(f"unknown colormap {colormap!r}: choose one of {', '.join(COLORMAPS)}")
    img = torch.as_tensor(img01).detach().cpu().float()
    if img.dim() == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.permute(1, 2, 0)
    mask = torch.as_tensor(cam).detach().cpu().float()
    if img.dim() != 3 or tuple(img.shape[:2]) != tuple(mask.shape):
        raise ConfigError(f"overlay needs an image (H,W,3) and a map (H,W) of the same size, got "
                          f"{tuple(img.shape)} and {tuple(mask.shape)}")
    heat = cv2.applyColorMap(np.uint8(255 * mask.clamp(0, 1).numpy()), COLORMAPS[colormap])
    heat = np.float32(cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)) / 255
    w = 1.0 - float(alpha)  # the package's image_weight
    out = (1 - w) * heat + w * img.clamp(0, 1).numpy()
    return np.uint8(255 * (out / np.max(out)))
