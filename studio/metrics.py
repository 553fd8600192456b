"""Display computations the pages need that ``nrrdd_core`` does not offer (yet).

Each is a few library calls; they belong in the library once the lead moves them there
(CIDD candidate listing next to ``methods.common``, set metrics next to ``evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nrrdd_core.cam import cam_ratio, teacher_cam
from nrrdd_core.device import make_generator
from nrrdd_core.methods.common import candidate_boxes, crop_patches, patch_cross_entropy
from nrrdd_core.models.teacher import Teacher


@dataclass
class Candidates:
    """CIDD candidates of one real image (SPEC 3.2), ``m`` of them, sorted by CAM ratio.

    Attributes:
        boxes: int64 ``(m,4)`` boxes ``(i, j, h, w)`` in pixels.
        crops01: ``(m,3,H,W)`` [0,1] crops resized to the image side (factor 1).
        ratio: ``(m,)`` CAM ratio ``sum_box C / sum C`` in [0,1].
        confidence: ``(m,)`` teacher probability of the true class on each crop, in [0,1].
        kept: ``(m,)`` bool, True for the ``top_t`` boxes by CAM ratio (the ones CIDD scores).
        lowest, highest: position of the candidate that CIDD keeps for this image under
            ``select="lowest"`` / ``"highest"`` (among the kept ones).
    """

    boxes: torch.Tensor
    crops01: torch.Tensor
    ratio: torch.Tensor
    confidence: torch.Tensor
    kept: torch.Tensor
    lowest: int
    highest: int


@torch.no_grad()
def cidd_candidates(teacher: Teacher, x01: torch.Tensor, cam: torch.Tensor, label: int, m: int,
                    top_t: int, seed: int, min_scale: float = 0.08) -> Candidates:
    """CIDD's candidate crops of one image ``x01`` ``(3,H,W)`` [0,1] with its CAM ``(H,W)`` in
    [0,1]: ``m`` RandomResizedCrop boxes (RDED's sampler, seeded), their CAM ratio, and the
    teacher's confidence on each crop (``exp(-CE)``, SPEC 3.2 step 3)."""
    size = x01.shape[-1]
    boxes = candidate_boxes(1, m, size, make_generator(seed), min_scale)
    ratio = cam_ratio(torch.as_tensor(cam).float(), boxes[0])
    order = torch.sort(ratio, descending=True, stable=True).indices
    boxes, ratio = boxes[:, order], ratio[order]
    x_norm = teacher.data_config.normalize(x01[None].to(teacher.device))
    crops = crop_patches(x_norm, boxes.to(teacher.device), size)
    conf = torch.exp(-patch_cross_entropy(teacher, crops, label))
    kept = torch.arange(m) < top_t
    kc = conf[:top_t]
    return Candidates(boxes[0], teacher.data_config.denormalize(crops).clamp(0, 1).cpu(), ratio,
                      conf, kept, int(kc.argmin()), int(kc.argmax()))


@torch.no_grad()
def set_metrics(teacher: Teacher, x01: torch.Tensor, labels: torch.Tensor) -> dict:
    """Teacher-side metrics of a synthetic (or real) set of images ``(N,3,H,W)`` [0,1] with
    labels ``(N,)``.

    Returns:
        ``teacher_acc`` (top-1 in [0,1]), ``teacher_conf`` (mean probability of the label),
        ``cam_area`` (mean fraction of pixels with CAM >= 0.5, i.e. 1 - Comp-DD complexity,
        SPEC 6), ``diversity`` (mean pairwise L2 distance between the teacher's pooled CAM-layer
        features of images of the same class, averaged over classes; across all images when
        every class has one image).
    """
    if len(x01) == 0:
        return {"teacher_acc": float("nan"), "teacher_conf": float("nan"),
                "cam_area": float("nan"), "diversity": float("nan")}
    x_norm = teacher.data_config.normalize(x01.to(teacher.device))
    feats = {}
    handle = teacher.layer().register_forward_hook(
        lambda mod, inp, out: feats.__setitem__("f", out.detach().float().mean((2, 3))))
    try:
        probs = torch.softmax(teacher(x_norm).float(), 1).cpu()
    finally:
        handle.remove()
    f = feats["f"].cpu()
    with torch.enable_grad():
        cam = teacher_cam(teacher, x_norm, labels.to(teacher.device)).float().cpu()
    groups = [f[labels == c] for c in labels.unique()]
    groups = [g for g in groups if len(g) > 1] or [f]
    dists = [torch.pdist(g).mean() for g in groups if len(g) > 1]
    return {"teacher_acc": float((probs.argmax(1) == labels).float().mean()),
            "teacher_conf": float(probs.gather(1, labels[:, None]).mean()),
            "cam_area": float((cam >= 0.5).float().mean()),
            "diversity": float(torch.stack(dists).mean()) if dists else float("nan")}
