"""``recsys-transfer env``: what this installation runs on -- versions of torch, fbgemm and TorchRec, which fbgemm
build (CPU or CUDA), the devices torch sees, and the torchrun world this process is part of."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """The facts :func:`describe` prints, as a dict."""
    import torch

    info: dict = {"python": sys.version.split()[0], "platform": platform.platform(),
                  "recsys-transfer": _version("recsys-transfer"), "torch": torch.__version__,
                  "torch_cuda": torch.version.cuda, "torchrec": _version("torchrec"),
                  "fbgemm-gpu": _version("fbgemm-gpu"), "fbgemm-gpu-cpu": _version("fbgemm-gpu-cpu"),
                  "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    builds = [n for n in ("fbgemm-gpu", "fbgemm-gpu-cpu") if info[n]]
    info["fbgemm_build"] = ("cuda" if builds == ["fbgemm-gpu"] else "cpu" if builds == ["fbgemm-gpu-cpu"]
                            else "both installed (the last one installed wins; uninstall one)" if builds else "none")
    try:
        import fbgemm_gpu  # noqa: F401

        info["fbgemm_import"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised: this command diagnoses installs
        info["fbgemm_import"] = f"failed: {type(exc).__name__}: {exc}"
    info["cuda_available"] = torch.cuda.is_available()
    info["devices"] = [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())] \
        if info["cuda_available"] else []
    info["nccl"] = torch.distributed.is_nccl_available() if torch.distributed.is_available() else False
    info["gloo"] = torch.distributed.is_gloo_available() if torch.distributed.is_available() else False
    info["world"] = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                     "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")}
    return info


def describe() -> str:
    info = environment()
    world = {k: v for k, v in info.pop("world").items() if v is not None}
    devices = info.pop("devices")
    lines = [f"{k:<16} {v}" for k, v in info.items()]
    lines.append(f"{'devices':<16} " + (", ".join(f"cuda:{k} {name}" for k, name in enumerate(devices)) or "cpu only"))
    lines.append(f"{'world':<16} " + (", ".join(f"{k}={v}" for k, v in world.items()) or "single process (no torchrun)"))
    return "\n".join(lines)
