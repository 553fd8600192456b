"""Teacher-side measures of an image set (synthetic or real) used to compare distilled sets.

- :func:`cam_area`: share of pixels the teacher's CAM covers (``1 -`` Comp-DD complexity, METHODS.md §7).
- :func:`feature_diversity`: mean pairwise L2 distance between feature vectors of images of the
  same class (ours; a simple intra-class diversity measure).
- :func:`set_metrics`: both of them plus the teacher's top-1 accuracy and confidence on a set.
"""

from __future__ import annotations

import torch

from .cam import ClassicCAM, complexity_score
from .models.teacher import Teacher


def cam_area(cam: torch.Tensor, threshold: float = 0.5) -> float:
    """Mean share of pixels with ``C >= threshold`` over a batch of CAM maps (``1 -`` the mean
    Comp-DD complexity, METHODS.md §7).

    Args:
        cam: maps ``(N,H,W)`` in [0,1].
        threshold: activation level counted as covered (0.5, as Comp-DD).

    Returns:
        float in [0,1] (NaN for an empty batch).
    """
    return float(1.0 - complexity_score(cam.float(), threshold).mean())


def feature_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise L2 distance between the feature vectors of images of the same class,
    averaged over classes with at least two images; over all images when no class has two.

    Args:
        features: ``(N,D)`` float feature vectors (e.g. pooled CAM-layer activations).
        labels: ``(N,)`` int64 class indices.

    Returns:
        float >= 0 in the features' units; NaN when fewer than two images are given.
    """
    f = features.float()
    groups = [f[labels == c] for c in labels.unique()]
    groups = [g for g in groups if len(g) > 1] or [f]
    dists = [torch.pdist(g).mean() for g in groups if len(g) > 1]
    return float(torch.stack(dists).mean()) if dists else float("nan")


@torch.no_grad()
def set_metrics(teacher: Teacher, x01: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Teacher-side metrics of an image set.

    Args:
        teacher: the frozen teacher (its ``data_config`` normalises the images; its CAM layer
            gives the features and the CAM, METHODS.md §4.1 classic CAM).
        x01: images ``(N,3,H,W)`` in [0,1] (any device).
        labels: ``(N,)`` int64 class indices (teacher logit order).

    Returns:
        ``teacher_acc`` (top-1 in [0,1]), ``teacher_conf`` (mean softmax probability of the
        label, in [0,1]), ``cam_area`` (:func:`cam_area` of the CAMs for the labels, in [0,1]),
        ``diversity`` (:func:`feature_diversity` of the CAM layer's spatially averaged
        activations). All NaN for an empty set.
    """
    if len(x01) == 0:
        return dict.fromkeys(("teacher_acc", "teacher_conf", "cam_area", "diversity"),
                             float("nan"))
    labels = labels.cpu()
    x_norm = teacher.data_config.normalize(x01.to(teacher.device))
    feats = {}
    handle = teacher.layer().register_forward_hook(
        lambda mod, inp, out: feats.__setitem__("f", out.detach().float().mean((2, 3))))
    try:
        probs = torch.softmax(teacher(x_norm).float(), 1).cpu()
    finally:
        handle.remove()
    with torch.enable_grad():
        cam = ClassicCAM(teacher).attribute(x_norm, labels.to(teacher.device)).cpu()
    return {"teacher_acc": float((probs.argmax(1) == labels).float().mean()),
            "teacher_conf": float(probs.gather(1, labels[:, None]).mean()),
            "cam_area": cam_area(cam),
            "diversity": feature_diversity(feats["f"].cpu(), labels)}
