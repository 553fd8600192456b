"""Expert training settings (METHODS.md §5.1): :class:`ExpertConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import ConfigBase, param
from ..dsa import DSA_STRATEGIES, check_strategies
from ..errors import ConfigError

ARCH = "convnet_in"
"""Architecture of every expert (and of EDF's student): ConvNet-IN."""


@dataclass(frozen=True)
class ExpertConfig(ConfigBase):
    """How to train the expert trajectories (METHODS.md §5.1). Defaults: small, for the built-in
    dataset on a CPU (3 experts x 20 epochs of a width-32 ConvNet-IN, plain SGD lr 0.2, batch 32,
    200 images per class, DSA: about 1 min per expert on one CPU thread); use :meth:`for_dataset`
    for the published settings.

    Measured on ``shapes`` (one expert, one CPU thread, test accuracy after E epochs / seconds):
    the former defaults lr 0.03, batch 64 reached 0.22-0.35 after 15-26 epochs (36-60 s); lr 0.1
    batch 64: 0.27 at 12; lr 0.3 batch 64: 0.26 at 12; lr 0.01 momentum 0.9: 0.39 at 14; lr 0.1
    batch 32: 0.47 at 14; lr 0.1 batch 16: 0.43-0.58 at 11-13; lr 0.2 batch 16: 0.64 at 12 (113 s
    under load); width 64 was ~5x slower per epoch; 500 images per class: 0.41 after 5 epochs
    (86 s). Chosen lr 0.2 batch 32: 0.51 at 15 epochs (44 s), 0.65 at 20 (61 s)."""

    num_experts: int = param(3, "number of expert trajectories", unit="experts", lo=1,
                             source="ours")
    epochs: int = param(20, "training epochs per expert (E; E+1 snapshots are saved)",
                        unit="epochs", lo=1, source="ours")
    lr: float = param(0.2, "SGD learning rate (constant; 0.01 in the papers at batch 256)", lo=0.0,
                      lo_open=True, source="ours")
    momentum: float = param(0.0, "SGD momentum", lo=0.0, hi=1.0, hi_open=True,
                            source="code (MTT buffer.py)")
    weight_decay: float = param(0.0, "SGD weight decay", lo=0.0, source="code (MTT buffer.py)")
    batch_size: int = param(32, "real images per SGD step (256 in the papers)", unit="images",
                            lo=1, source="ours")
    depth: int = param(0, "ConvNet-IN depth (0 = by image size: 3 at 32 px, 4 at 64, 5 at 128)",
                       lo=0, hi=8, source="code (MTT / DATM ConvNetD3-D5 by resolution)")
    width: int = param(32, "ConvNet-IN channels (128 in the papers)", unit="channels", lo=1,
                       source="ours")
    train_per_class: int = param(200, "real training images per class (the first ones in stored "
                                 "order); 0 = all", unit="images", lo=0, source="ours")
    dsa: bool = param(True, "DSA augmentation on every batch (METHODS.md §5.2)",
                      source="code (MTT buffer.py, DSA DiffAugment)")
    dsa_strategies: str = param(",".join(DSA_STRATEGIES), "comma-separated DSA strategies",
                                source="code (MTT buffer.py, DSA DiffAugment)", ui=False)
    zca: bool = param(False, "ZCA-whiten the images (MTT/DATM do for CIFAR and Tiny)",
                      source="code (MTT buffer.py, kornia ZCA)")
    zca_eps: float = param(0.1, "ZCA regulariser eps", lo=0.0, lo_open=True,
                           source="code (MTT buffer.py, kornia ZCA)")
    gsam: bool = param(False, "GSAM optimiser (DATM/EDF experts); not implemented",
                       source="code (DATM expert training, GSAM)")
    gsam_rho: float = param(0.01, "GSAM rho", lo=0.0,
                            source="code (DATM expert training, GSAM)", ui=False)
    gsam_alpha: float = param(0.3, "GSAM alpha", lo=0.0,
                              source="code (DATM expert training, GSAM)", ui=False)
    seed: int = param(0, "seed of the expert initialisations, shuffles and augmentations", lo=0,
                      source="ours")

    def validate(self) -> None:
        """Field ranges, plus: GSAM is not implemented, DSA strategies must be valid.

        Raises:
            ConfigError: naming the field.
        """
        super().validate()
        if self.gsam:
            raise ConfigError("gsam=True: the GSAM expert optimiser is not implemented in this "
                              "version; use plain SGD (gsam=False, the MTT setting)")
        check_strategies(self.dsa_strategies.split(","))

    @classmethod
    def for_dataset(cls, name: str, **overrides) -> "ExpertConfig":
        """The published expert settings (METHODS.md §5.1; MTT/DATM buffers) for a dataset family:
        CIFAR-10/100: 100 experts x 50 epochs, ConvNet-IN-3 width 128, ZCA; Tiny-ImageNet:
        depth 4, ZCA; ImageNet subsets (imagenette, imagewoof, ... at 128 px): depth 5, no ZCA.
        Anything else (e.g. the built-in ``shapes``) gets the small defaults.

        Raises:
            ConfigError: an override is invalid.
        """
        n = name.lower()
        paper = dict(num_experts=100, epochs=50, width=128, lr=0.01, batch_size=256,
                     train_per_class=0)
        table = {"cifar": dict(paper, depth=3, zca=True), "tiny": dict(paper, depth=4, zca=True),
                 "image": dict(paper, depth=5, zca=False)}
        base = next((v for k, v in table.items() if n.startswith(k)), {})
        return cls.from_dict({**base, **overrides})

    def arch_kwargs(self, image_size: int) -> dict:
        """``{"depth", "width"}`` of the expert ConvNet-IN for ``image_size`` px input."""
        from ..models.convnet import default_depth

        return {"depth": self.depth or default_depth(image_size), "width": self.width}
