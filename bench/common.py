"""Shared helpers of the benchmark scripts (bench/speed.py, bench/accuracy.py).

Datasets and teachers come from the public ``nrrdd_core`` API; this module only adds what a
benchmark needs around them: where the shared data is, machine facts recorded next to every
figure (device, threads, load average), peak-memory readings, a JSON cache of finished units and
markdown tables.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as ``python bench/x.py`` from a checkout
    sys.path.insert(0, str(REPO))

from nrrdd_core.data import DatasetBundle, list_datasets, load_dataset  # noqa: E402
from nrrdd_core.io import atomic_write_json, atomic_write_text, config_key  # noqa: E402
from nrrdd_core.models import (Teacher, TeacherTrainConfig, akamaster_data_config,  # noqa: E402
                               load_resnet_cifar_checkpoint, shipped_teacher, train_teacher)

log = logging.getLogger("bench")

SHARED_DATA = Path(os.environ.get("NRRDD_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS_DIR = REPO / "bench" / "results"
RESNET20 = "cifar10_resnet20_akamaster.th"
CIFAR_FILES = {"train_file": "cifar10_train.npz", "test_file": "cifar10_test.npz"}
#: teacher of the ``--tiny`` settings: a few-second ConvNet-BN on a small ``shapes`` set
TINY_TEACHER = TeacherTrainConfig(arch="convnet_bn", width=8, epochs=1, seed=0)
TINY_SHAPES = {"train_per_class": 20, "test_per_class": 5}


def bench_cache() -> Path:
    """Folder of finished benchmark units: ``$NRRDD_BENCH_CACHE`` or ``bench/cache/``."""
    root = Path(os.environ.get("NRRDD_BENCH_CACHE", REPO / "bench" / "cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)


# ---- data and teachers ----------------------------------------------------------------------------
def load_cifar10(root: Path = SHARED_DATA) -> DatasetBundle:
    """The JPEG-decoded CIFAR-10 of ``root`` (20,000 train / 10,000 test images) through the
    ``npz`` dataset entry.

    Raises:
        DataError: files missing; RuntimeError: the ``npz`` entry is not available in this build.
    """
    if "npz" not in list_datasets():
        raise RuntimeError("the 'npz' dataset entry (nrrdd_core/data/npz.py) is not available")
    return load_dataset("npz", root=str(root), **CIFAR_FILES)


def cifar_args(root: Path = SHARED_DATA) -> dict:
    """The ``load_dataset`` arguments of :func:`load_cifar10` (recorded in results)."""
    return {"name": "npz", "root": str(root), **CIFAR_FILES}


def load_shapes(tiny: bool = False) -> DatasetBundle:
    """The built-in ``shapes`` dataset (32 px, 10 classes); ``tiny``: 20 train / 5 test per class."""
    return load_dataset("shapes", **(TINY_SHAPES if tiny else {}))


def resnet20_teacher(root: Path = SHARED_DATA, device: str = "cpu") -> Teacher:
    """The pretrained ResNet-20 (akamaster) in ``root`` (trained on original CIFAR pixels)."""
    return load_resnet_cifar_checkpoint(root / RESNET20, "resnet20_cifar", akamaster_data_config(),
                                        device=device)


def shapes_teacher(bundle: DatasetBundle, tiny: bool, device: str = "cpu") -> tuple[Teacher, str]:
    """The shipped teacher of ``shapes`` when present (not in ``tiny`` mode), else a small
    ConvNet-BN trained (and cached) by ``train_teacher``. Returns ``(teacher, description)``."""
    if not tiny:
        try:
            return shipped_teacher(device), "shipped_teacher() (ResNet-20)"
        except Exception as exc:  # noqa: BLE001 - missing asset: fall back, say so
            log.warning("no shipped teacher (%s); training a small one", exc)
    cfg = TINY_TEACHER if tiny else TeacherTrainConfig(arch="convnet_bn", width=32, epochs=3)
    t = train_teacher(cfg, bundle, device=device)
    return t, f"train_teacher(convnet_bn width {cfg.width}, {cfg.epochs} epochs)"


# ---- machine facts and memory -------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    """What a figure was measured on: device, CPU, threads, load average, versions, time."""
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        info["loadavg"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs`` 5); False when
    the platform does not allow it (then the peak covers the whole process lifetime)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> tuple[float, float]:
    """``(current, peak)`` resident set size of this process in MiB (``/proc/self/status``
    VmRSS / VmHWM; ``getrusage`` peak elsewhere). tracemalloc does not see torch's buffers."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        kib = lambda k: int(fields[k].split()[0])  # noqa: E731
        return kib("VmRSS") / 1024, kib("VmHWM") / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


# ---- cached units ----------------------------------------------------------------------------------
def cached_unit(kind: str, spec: dict, compute: Callable[[], dict], cache: bool = True) -> dict:
    """Return the JSON result of the unit ``(kind, spec)`` from ``bench_cache()/<kind>/<key>.json``,
    computing and writing it (atomically) when absent. ``spec`` must be JSON-serialisable and
    hold everything the result depends on."""
    path = bench_cache() / kind / f"{config_key(spec)}.json"
    if cache and path.is_file():
        try:
            return json.loads(path.read_text())["result"]
        except (OSError, ValueError, KeyError):
            log.warning("ignoring unreadable cache file %s", path)
    t0 = time.perf_counter()
    result = compute()
    if cache:
        atomic_write_json(path, {"kind": kind, "spec": spec, "result": result,
                                 "seconds": time.perf_counter() - t0})
    return result


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_json(path, obj)


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write_text(path, text)


# ---- markdown ---------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    fmt = lambda v: "" if v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
