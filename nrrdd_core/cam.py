"""Class activation maps (CAM) and the masks and scores built on them.

One class per CAM method over the base :class:`CAM`, one verb (as pytorch-grad-cam and captum)::

    CAM_cls = get_cam(name)                      # registry CAMS: name -> class (the UI lists it)
    CAM_cls.supported_layers(teacher)            # layers the method can use
    CAM_cls(teacher_or_model, layer).attribute(x_norm, targets)   # (N,H,W) in [0,1]

* :class:`ClassicCAM` (``"cam"``): CAM of Zhou et al. 2016 (METHODS.md §4.1, NRR-DD Eq. 1), GAP
  or flatten classifier.
* :class:`GradCAM` (``"gradcam_torch"``): torch-native batched Grad-CAM that stays on the device
  (used inside optimisation loops: NRR-DD masks, EDF's DAE); equals ``pytorch_grad_cam.GradCAM``.
* :class:`PackageCAM` subclasses: the grad-cam package's GradCAM, GradCAM++, XGradCAM, ScoreCAM,
  LayerCAM, EigenCAM, side effects contained (for the explorer).
* :func:`noncritical_mask` (METHODS.md §4.3 Eq. 4), :func:`noncritical_share`, :func:`dae_weight`
  (METHODS.md §5.5), :func:`complexity_score` (METHODS.md §7), :func:`cam_ratio` (METHODS.md §4.2),
  :func:`overlay` and :func:`draw_boxes` (display).

Conventions: ``x_norm`` are normalised images ``(N,3,H,W)``; ``targets`` holds one class index per
image (int64 ``(N,)``; a single index for a whole batch is refused); CAM maps are ``(N,H,W)``
float in [0,1], min-max normalised per image (so a threshold is relative to each image), and a
constant map becomes all zeros. Every CAM computes with the model in eval mode and restores each
module's train/eval mode, each parameter's ``requires_grad`` and ``.grad``, and removes its
hooks, also after an exception.
"""

from __future__ import annotations

import abc
import logging
from contextlib import contextmanager
from typing import ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .display import COLORMAPS, draw_boxes, noncritical_share, overlay  # noqa: F401 - re-exported
from .errors import ConfigError

log = logging.getLogger(__name__)

MASK_MODES = ("soft", "binary", "scaled")
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


# ----------------------------------------------------------------------------- layers

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


def _unwrap(model) -> tuple[nn.Module, object | None]:
    """``(nn.Module, teacher or None)`` of a model or a :class:`~nrrdd_core.models.teacher.Teacher`."""
    if isinstance(model, nn.Module):
        return model, None
    if isinstance(getattr(model, "model", None), nn.Module) and hasattr(model, "data_config"):
        return model.model, model
    raise ConfigError(f"a CAM needs an nn.Module or a Teacher, got {type(model).__name__}")


@torch.no_grad()
def layer_outputs(model, image_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Output shape ``(K,h,w)`` of every named module of ``model`` that outputs a 4-D tensor, in
    module order, from one forward of a seeded random batch of 2 images (modes restored).

    Args:
        model: an ``nn.Module`` or a Teacher (then ``image_size`` defaults to its data config's).
        image_size: input side in pixels.

    Raises:
        ConfigError: no ``image_size`` for a bare module.
    """
    return {n: tuple(s) for n, (s, _) in _probe(model, image_size).items() if n}


def _probe(model, image_size: int | None) -> dict[str, tuple[tuple[int, ...], bool]]:
    """``{name: ((K,h,w), feeds_classifier)}``: ``feeds_classifier`` when the output, average
    pooled (GAP nets) or flattened (flatten nets), is exactly what the classifier receives."""
    net, teacher = _unwrap(model)
    if image_size is None:
        if teacher is None:
            raise ConfigError("supported_layers of a bare nn.Module needs image_size")
        image_size = teacher.data_config.image_size
    p = next(net.parameters(), None)
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    x = x.to(p.device if p is not None else "cpu")
    outs: dict[str, torch.Tensor] = {}
    fc_in: dict = {}
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]

    def keep(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                outs[name] = output.detach().clone()
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in net.named_modules()]
    if linears:
        handles.append(linears[-1].register_forward_hook(
            lambda m, i, o: fc_in.__setitem__("x", i[0].detach().reshape(len(i[0]), -1))))
    try:
        with _contained(net, freeze=False):
            net(x)
    finally:
        for h in handles:
            h.remove()
    feats = fc_in.get("x")
    out = {}
    for name, a in outs.items():
        feeds = False
        if feats is not None:
            for f in (a.mean((2, 3)), a.flatten(1)):
                if f.shape == feats.shape and torch.allclose(f, feats, rtol=1e-4, atol=1e-5):
                    feeds = True
        out[name] = (tuple(a.shape[1:]), feeds)
    return out


# ----------------------------------------------------------------------------- CAM classes

class CAM(abc.ABC):
    """A class activation map method bound to a model and a layer (the one verb:
    :meth:`attribute`). Subclasses implement :meth:`_attribute` (the weighting rule) and
    :meth:`_supports` (which layers fit); the base class resolves the layer, checks the targets
    and moves the result to the input's device.

    Args:
        model: an ``nn.Module`` taking normalised images, or a
            :class:`~nrrdd_core.models.teacher.Teacher` (its ``model``).
        layer: the module, its dotted name, or None (a Teacher's ``cam_layer``).

    Raises:
        ConfigError: no layer for a bare module, or no module of that name (the message lists the
            supported ones).

    Example::

        cam = get_cam("gradcam_torch")(teacher).attribute(x_norm, y)   # (N,H,W) in [0,1]
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    """Display name for the UI."""
    uses_target: ClassVar[bool] = True
    """False for methods whose map ignores the target class (EigenCAM)."""

    def __init__(self, model, layer: nn.Module | str | None = None):
        self.model, self.teacher = _unwrap(model)
        if layer is None:
            if self.teacher is None:
                raise ConfigError(f"{self.title or type(self).__name__} of a bare nn.Module needs "
                                  "a layer")
            layer = self.teacher.cam_layer
        if isinstance(layer, str):
            modules = dict(self.model.named_modules())
            if layer not in modules:
                size = self.teacher.data_config.image_size if self.teacher is not None else None
                hint = f": supported layers {self.supported_layers(model)[-8:]}" if size else ""
                raise ConfigError(f"no layer {layer!r} in the model{hint}")
            self.layer_name, layer = layer, modules[layer]
        else:
            self.layer_name = next((n for n, m in self.model.named_modules() if m is layer), "?")
        self.layer = layer

    def attribute(self, x_norm: torch.Tensor, targets) -> torch.Tensor:
        """CAMs of ``x_norm`` for ``targets``.

        Args:
            x_norm: normalised images ``(N,3,H,W)`` on the model's device (may require grad:
                it is not touched).
            targets: one class index per image, int ``(N,)`` (one index for a batch is refused).

        Returns:
            ``(N,H,W)`` float32 in [0,1] on ``x_norm``'s device, detached; per-image min-max
            normalised (a constant map gives zeros).

        Raises:
            ConfigError: targets not one per image or out of range; the layer does not output a
                ``(N,K,h,w)`` tensor or does not fit the method.
            RuntimeError: the grad-cam package failed (package methods).
        """
        t = _check_targets(targets, len(x_norm), x_norm.device)
        return self._attribute(x_norm, t).detach().float().to(x_norm.device)

    @abc.abstractmethod
    def _attribute(self, x_norm: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The method's ``(N,H,W)`` map in [0,1]; ``targets`` int64 ``(N,)`` on the device."""

    @classmethod
    def supported_layers(cls, model, image_size: int | None = None) -> list[str]:
        """Dotted names of the modules of ``model`` this method can use, in module order.

        Args:
            model: an ``nn.Module`` or a Teacher; image_size: input side (a Teacher's by default).
        """
        return [n for n, (shape, feeds) in _probe(model, image_size).items()
                if n and cls._supports(shape, feeds)]

    @classmethod
    def _supports(cls, shape: tuple[int, ...], feeds_classifier: bool) -> bool:
        """Whether a layer whose output is ``(K,h,w)`` fits (default: a spatial map, h*w > 1)."""
        return shape[1] * shape[2] > 1


CAMS: dict[str, type[CAM]] = {}
"""Registry of CAM methods: name -> class (the UI lists it, configs take its names)."""


def register_cam(cls: type[CAM]) -> type[CAM]:
    """Class decorator adding ``cls`` to :data:`CAMS` under ``cls.name``."""
    CAMS[cls.name] = cls
    return cls


def get_cam(name: str) -> type[CAM]:
    """The CAM class registered as ``name``.

    Raises:
        ConfigError: unknown name (lists the known ones).
    """
    if name not in CAMS:
        raise ConfigError(f"unknown CAM method {name!r}: choose one of {', '.join(CAMS)}")
    return CAMS[name]


@register_cam
class ClassicCAM(CAM):
    """CAM (Zhou et al. 2016; METHODS.md §4.1, NRR-DD Eq. 1): ``CAM_y = sum_k W_fc[y,k] f_k``.

    ``f`` = output ``(N,K,h,w)`` of the layer. If the classifier takes ``K`` inputs (global
    average pooling nets) the weights are ``W_fc[y]``; if it takes ``K*h*w`` (flatten nets such as
    ConvNet) the per-location decomposition ``W_fc[y].view(K,h,w)`` is used. Then ReLU, bilinear
    upsampling (``align_corners=False``) to ``(H,W)`` and per-image min-max normalisation [ours].
    The bias is left out (it does not change a normalised map). On a GAP network this equals
    normalised Grad-CAM. Supported layers: those whose output, pooled or flattened, is exactly the
    classifier's input (the last feature map), with spatial extent.

    Args:
        model, layer: as :class:`CAM`. fc: the classifier (default :func:`find_classifier`).
    """

    name, title = "cam", "CAM (Zhou et al.)"

    def __init__(self, model, layer: nn.Module | str | None = None, fc: nn.Linear | None = None):
        super().__init__(model, layer)
        self.fc = fc

    @classmethod
    def _supports(cls, shape, feeds_classifier):
        return feeds_classifier and shape[1] * shape[2] > 1

    def _attribute(self, x_norm, targets):
        fc = self.fc if self.fc is not None else find_classifier(self.model)
        t = _check_targets(targets, len(x_norm), x_norm.device, fc.out_features)
        with torch.no_grad(), _contained(self.model, freeze=False), _capture(self.layer) as store:
            self.model(x_norm)
            f = store["act"]
            n, k, h, w = f.shape
            weight = fc.weight[t].to(f.dtype)
            if fc.in_features == k:
                cam = torch.einsum("nk,nkhw->nhw", weight, f)
            elif fc.in_features == k * h * w:
                cam = (weight.view(n, k, h, w) * f).sum(1)
            else:
                raise ConfigError(f"classifier takes {fc.in_features} inputs but the CAM layer "
                                  f"gives {k}x{h}x{w}: pick the layer right before pooling/flatten")
            return _minmax(_resize(cam.clamp_min(0), tuple(x_norm.shape[-2:])))


@register_cam
class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al. 2017), batched, torch-native, on the input's device (used inside
    optimisation loops: NRR-DD masks, EDF's DAE).

    ``w_k = mean_{i,j} d logit_y / d A_k[i,j]``, ``cam = ReLU(sum_k w_k A_k)`` with ``A`` = layer
    output. Then, as ``pytorch_grad_cam.GradCAM``: min-max normalise per image, resize bilinearly
    (half-pixel centres, as cv2 INTER_LINEAR) to ``(H,W)``, min-max normalise again; the result
    matches the package within 1e-4. Gradients are taken w.r.t. the captured activation only
    (``torch.autograd.grad``): no parameter ``.grad`` is filled, the input's ``.grad`` is
    untouched, it works for a frozen teacher and inside an outer ``torch.no_grad()``.
    """

    name, title = "gradcam_torch", "Grad-CAM (batched, torch)"

    def _attribute(self, x_norm, targets):
        with torch.enable_grad(), _contained(self.model, freeze=True), \
                _capture(self.layer, leaf=True) as store:
            logits = self.model(x_norm.detach())
            t = _check_targets(targets, len(x_norm), x_norm.device, logits.shape[1])
            act = store["act"]
            grads, = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), act)
        cam = (grads.mean((2, 3))[:, :, None, None] * act.detach()).sum(1).clamp_min(0)
        return _minmax(_resize(_minmax(cam), tuple(x_norm.shape[-2:])))


class PackageCAM(CAM):
    """A method of the grad-cam package (``pytorch_grad_cam``), side effects contained.

    Runs ``with Cls(model=..., target_layers=[layer])`` and one ``ClassifierOutputTarget`` per
    image under ``torch.enable_grad()`` on a copy of the input that requires grad, with the
    parameters frozen for the call; module modes, ``requires_grad`` and ``.grad`` are restored and
    the package's hooks released, also after an exception. Computed on the CPU side of the
    package (numpy), returned on the input's device.
    """

    package_class: ClassVar[str] = ""
    """Class name in ``pytorch_grad_cam``."""

    def _attribute(self, x_norm, targets):
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cls = getattr(pgc, self.package_class)
        with torch.enable_grad(), _contained(self.model, freeze=True):
            x = x_norm.detach().clone().requires_grad_(True)
            with cls(model=self.model, target_layers=[self.layer]) as cam:
                try:
                    out = cam(input_tensor=x,
                              targets=[ClassifierOutputTarget(int(c)) for c in targets.cpu()])
                except IndexError as exc:  # the package's __exit__ would swallow (and print) it
                    raise RuntimeError(f"{self.name} failed: {exc}") from exc
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).clamp_(0, 1)


def _package_cam(name: str, package_class: str, title: str, uses_target: bool = True,
                 doc: str = "") -> type[CAM]:
    cls = type(package_class, (PackageCAM,), {
        "name": name, "title": title, "package_class": package_class, "uses_target": uses_target,
        "__doc__": f"{title}: ``pytorch_grad_cam.{package_class}`` (see :class:`PackageCAM`). {doc}",
        "__module__": __name__})
    return register_cam(cls)


GradCAMPackage = _package_cam("gradcam", "GradCAM", "Grad-CAM (grad-cam package)")
GradCAMPlusPlus = _package_cam("gradcam++", "GradCAMPlusPlus", "Grad-CAM++")
XGradCAM = _package_cam("xgradcam", "XGradCAM", "XGrad-CAM")
ScoreCAM = _package_cam("scorecam", "ScoreCAM", "Score-CAM",
                        doc="One forward per channel per image (seconds per image on a CPU).")
LayerCAM = _package_cam("layercam", "LayerCAM", "LayerCAM")
EigenCAM = _package_cam("eigencam", "EigenCAM", "EigenCAM", uses_target=False,
                        doc="Ignores the target class (first principal component).")

CAM_METHODS = tuple(CAMS)
"""Names in :data:`CAMS`, in registration order (``"cam"`` and ``"gradcam_torch"`` are ours, the
rest the grad-cam package's classes)."""


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


def dae_weight(cam: torch.Tensor, beta: float, threshold: float = 0.0) -> torch.Tensor:
    """EDF's discriminative area enhancement weight (METHODS.md §5.5; EDF code
    ``create_soft_mask``).

    ``F = 1`` where ``A < t``, else ``A + beta``, with ``t = mean(A)`` of its image
    (``threshold = 0``, the released default) or the fixed ``threshold`` (0.5 in some official
    configs); used as ``x.grad *= F``.

    Args:
        cam: Grad-CAM-family map ``(N,H,W)`` in [0,1].
        beta: enhancement offset (1; 2 for ImageWoof).
        threshold: 0 = per-image mean; > 0 = this fixed activation level.

    Returns:
        ``(N,1,H,W)`` weights >= 1 (for ``beta >= 1``), same device and dtype as ``cam``.
    """
    t = cam.mean((1, 2), keepdim=True) if threshold <= 0 else threshold
    return torch.where(cam < t, torch.ones_like(cam), cam + beta)[:, None]


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
