"""Teachers and model builders (METHODS.md §1.1).

- :func:`build_model` / :func:`list_models` / :func:`default_cam_layer` / :func:`get_classifier`:
  the architecture registry (``convnet_bn``, ``convnet_in``, ``resnet18_small``, ``resnet18``,
  ``resnet50``, ``mobilenet_v2``, ``resnet20_cifar`` ... ``resnet56_cifar``).
- :class:`Teacher`: a frozen classifier with its data config and CAM layer.
- :func:`load_resnet_cifar_checkpoint` (public CIFAR ResNet checkpoints),
  :func:`pretrained_teacher` (torchvision ImageNet weights).
- :class:`TeacherTrainConfig` + :func:`train_teacher` (squeeze step, cached),
  :func:`evaluate_accuracy`, :func:`shipped_teacher` (built-in dataset's teacher).
"""

from .registry import build_model, default_cam_layer, get_classifier, list_models, register_model
from .resnet_cifar import (akamaster_data_config, load_resnet_cifar_checkpoint,
                           public_checkpoint_data_config)
from .teacher import Teacher
from .torchvision_models import imagenet_mean_std, pretrained_teacher, weights_path

_TRAIN_NAMES = ("TeacherTrainConfig", "evaluate_accuracy", "shipped_teacher", "train_teacher")


def __getattr__(name: str):
    # train.py is imported on first use so that ``python -m nrrdd_core.models.train`` runs it once
    if name in _TRAIN_NAMES:
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Teacher", "TeacherTrainConfig", "akamaster_data_config", "build_model",
           "default_cam_layer", "evaluate_accuracy", "get_classifier", "imagenet_mean_std",
           "list_models", "load_resnet_cifar_checkpoint", "pretrained_teacher",
           "public_checkpoint_data_config", "register_model",
           "shipped_teacher", "train_teacher", "weights_path"]
