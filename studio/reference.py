"""Published top-1 accuracies of METHODS.md §6, for the Evaluate page's results table."""

from __future__ import annotations

#: (method, dataset, ipc, student family) -> published top-1 %. Student families: "convnet"
#: (ConvNet-BN/IN, any depth) and "resnet18" (ResNet-18, small-input or stock).
PUBLISHED: dict[tuple[str, str, int, str], float] = {
    ("sre2l", "cifar10", 10, "resnet18"): 29.3,
    ("rded", "cifar10", 10, "convnet"): 50.2,
    ("rded", "cifar10", 10, "resnet18"): 37.1,
    ("rded", "cifar10", 50, "resnet18"): 62.1,
    ("nrrdd", "cifar10", 10, "convnet"): 66.7,
    ("nrrdd", "cifar10", 10, "resnet18"): 72.2,
    ("nrrdd", "cifar100", 10, "resnet18"): 62.7,
    ("nrrdd", "imagenette", 10, "resnet18"): 66.2,
    ("nrrdd", "imagenet", 10, "resnet18"): 46.1,
    ("nrrdd", "imagenet", 50, "resnet18"): 60.2,
    ("edf", "imagewoof", 10, "convnet"): 41.8,
    ("edf", "imagemeow", 10, "convnet"): 52.6,
    ("edf", "imageyellow", 10, "convnet"): 68.2,
    ("edf", "cifar10", 50, "convnet"): 77.3,
}


def student_family(student: str) -> str:
    """``convnet_bn`` -> ``convnet``, ``resnet18_small`` -> ``resnet18``, others unchanged."""
    if student.startswith("convnet"):
        return "convnet"
    if student.startswith("resnet18"):
        return "resnet18"
    return student


def dataset_family(manifest: dict) -> str:
    """The METHODS.md §6 dataset name of a run: from the dataset entry, its subset or its files."""
    ds = manifest.get("dataset", {})
    args = ds.get("args", {})
    text = " ".join(str(v) for v in [ds.get("name", ""), args.get("subset", ""),
                                     args.get("train_file", "")]).lower()
    for name in ("cifar100", "cifar10", "imagenette", "imagewoof", "imagemeow", "imageyellow"):
        if name in text:
            return name
    return ds.get("name", "")


def published(manifest: dict, student: str) -> float | None:
    """The published figure for a run's setting, or None when METHODS.md §6 has no such setting.
    Only runs over all classes of the dataset match."""
    ds = manifest.get("dataset", {})
    if len(ds.get("classes", [])) != len(ds.get("all_class_names", [])):
        return None
    key = (manifest.get("method"), dataset_family(manifest), int(manifest.get("ipc", 0)),
           student_family(student))
    return PUBLISHED.get(key)
