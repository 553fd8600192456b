"""Expert trajectories for trajectory matching (METHODS.md §5.1; MTT / DATM / EDF code).

An *expert* is a ConvNet-IN trained on the real training split with plain SGD (momentum 0,
wd 0; lr 0.01 and batch 256 in the papers, smaller CPU defaults in :class:`ExpertConfig`),
cross-entropy and DSA augmentation (METHODS.md §5.2). Its *trajectory* is the flat parameter
vector (``parameters()`` order, float32) at initialisation and after every epoch: ``E+1``
snapshots of length ``P``.

- :mod:`.config`: :class:`ExpertConfig` (settings, :meth:`ExpertConfig.for_dataset`).
- :mod:`.buffer`: the buffer folder on disk (:class:`ExpertBuffer`, :func:`load_buffer`,
  :func:`buffer_dir`, checksummed manifest).
- :mod:`.train`: :class:`ExpertTrainer` (one epoch per step, exact resume) and
  :func:`train_experts` (cached).

Shared with EDF and its evaluation, but living in their own homes: :mod:`nrrdd_core.zca`
(:class:`~nrrdd_core.zca.ZCA`, :func:`~nrrdd_core.zca.zca_for`), :mod:`nrrdd_core.models.flat`
(:func:`~nrrdd_core.models.flat.seeded_model`, :class:`~nrrdd_core.models.flat.ParamLayout`) and
:mod:`nrrdd_core.losses` (:func:`~nrrdd_core.losses.soft_cross_entropy`); they are re-exported
here for existing imports. New code belongs in those modules, not here.
"""

from ..data.base import dataset_identity
from ..losses import soft_cross_entropy
from ..models.flat import ParamLayout, seeded_model
from ..zca import ZCA, zca_for
from .buffer import EXPERT_KIND, MANIFEST, ExpertBuffer, buffer_dir, file_sha256, load_buffer
from .config import ARCH, ExpertConfig
from .train import ExpertTrainer, Progress, train_experts

__all__ = ["ARCH", "EXPERT_KIND", "MANIFEST", "ExpertBuffer", "ExpertConfig", "ExpertTrainer",
           "ParamLayout", "Progress", "ZCA", "buffer_dir", "dataset_identity", "file_sha256",
           "load_buffer", "seeded_model", "soft_cross_entropy", "train_experts", "zca_for"]
