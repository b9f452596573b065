"""What the ``pycuda`` backend checks before and around its first contact with a GPU.

Plain functions, so they are tested where there is no GPU (none imports PyCUDA): the
toolkit's ``nvcc`` on PATH (PyCUDA compiles kernels at run time), a driver new enough
for the CUDA that PyCUDA and the toolkit were built for, pinning checked against
nvidia-smi, and which driver errors leave a context unusable (by their text: PyCUDA's
exception classes do not tell).
"""

from __future__ import annotations

import re
import shutil
import subprocess

from gpu_tasks.errors import ConfigError

# Pieces of cuGetErrorString() texts (PyCUDA puts them in its messages) of the
# errors that poison a context: once one happened, every later call fails too.
# PyCUDA raises most of them as LogicError, and also raises LaunchError for errors
# that are not sticky (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: "too many resources
# requested for launch"), so the text decides, never the class.
_STICKY_ERRORS = (
    "illegal memory access",
    "illegal address",
    "unspecified launch failure",
    "launch failed",
    "launch timed out",
    "timed out and was terminated",
    "device-side assert",
    "illegal instruction",
    "misaligned address",
    "not supported on global/shared address space",
    "invalid program counter",
    "hardware stack error",
    "uncorrectable ecc",
    "ecc uncorrectable",
)

_NOT_STICKY_ERRORS = (
    "too many resources requested",
    "out of resources",
    "incompatible texturing",
)


def sticky_error(text: str) -> bool:
    """True when a driver error's text is one of those that leave the context unusable."""
    text = text.lower()
    if any(marker in text for marker in _NOT_STICKY_ERRORS):
        return False
    return any(marker in text for marker in _STICKY_ERRORS)


Version = tuple[int, int]


def nvcc_version(nvcc: str) -> Version | None:
    """The CUDA release of the toolkit's ``nvcc`` ("release 13.0, V13.0.48"), if it says."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_version(number: int) -> Version:
    """CUDA's encoding of a version (12040) as (12, 4)."""
    return number // 1000, (number % 1000) // 10


def version_problems(driver: Version, pycuda_built: Version | None,
                     toolkit: Version | None) -> list[str]:
    """What cannot work with a driver that supports CUDA ``driver``: PyCUDA built against a
    newer CUDA (from CUDA 13 it calls cuCtxCreate_v4, which only R580+ drivers have), or an
    nvcc newer than the driver (its kernels would not load)."""
    def text(v: Version) -> str:
        return f"{v[0]}.{v[1]}"

    problems = []
    if pycuda_built is not None and pycuda_built > driver:
        problems.append(
            f"PyCUDA was built against CUDA {text(pycuda_built)} but the NVIDIA driver supports "
            f"CUDA up to {text(driver)}: install a driver for CUDA {text(pycuda_built)} or newer "
            f"(CUDA 13 needs R580+), or rebuild PyCUDA against a toolkit <= {text(driver)} "
            "(ops/gpu-check builds it with the host's nvcc)")
    if toolkit is not None and toolkit > driver:
        problems.append(
            f"nvcc is from CUDA {text(toolkit)} but the NVIDIA driver supports CUDA up to "
            f"{text(driver)}, so the kernels it compiles would not load: put a toolkit <= "
            f"{text(driver)} first on PATH, or update the driver")
    return problems


def require_nvcc() -> str:
    """``nvcc``'s path, or a :class:`ConfigError` that says how to provide it: PyCUDA compiles
    every kernel at run time by running ``nvcc`` from PATH."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise ConfigError(
            "nvcc is not on PATH: PyCUDA compiles this worker's kernels at run time with the "
            "CUDA toolkit's nvcc. Put the toolkit's bin directory on the worker's PATH (the "
            "systemd unit sets PATH=...:/usr/local/cuda/bin; override it in "
            "/etc/gpu-tasks/env for a toolkit elsewhere)")
    return nvcc


def normalize_pci_bus_id(bus_id: str) -> str:
    """``domain:bus:device.function`` in one spelling, whoever wrote it.

    CUDA writes ``0000:3B:00.0`` and nvidia-smi ``00000000:3B:00.0``; both become
    ``0000:3b:00.0``.
    """
    text = bus_id.strip()
    try:
        domain, bus, rest = text.split(":")
        device, function = rest.split(".")
        return (f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}."
                f"{int(function, 16):x}")
    except ValueError:
        return text.lower()


def physical_gpu_uuid(gpu_index: int, bus_id: str) -> str | None:
    """The UUID of physical GPU ``gpu_index`` from nvidia-smi, after checking that it is the
    device at ``bus_id`` (the one CUDA gave this process); else :class:`ConfigError`.

    None when nvidia-smi is absent or fails (nothing to check against).
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,pci.bus_id,uuid",
                              "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[part.strip() for part in line.split(",")] for line in out.splitlines()
            if line.strip()]
    for row in rows:
        if len(row) >= 3 and row[0] == str(gpu_index):
            smi_bus_id = normalize_pci_bus_id(row[1])
            if smi_bus_id != bus_id:
                raise ConfigError(
                    f"pinning is wrong: this worker serves GPU {gpu_index} (PCI "
                    f"{smi_bus_id} per nvidia-smi) but its CUDA device 0 is at PCI {bus_id}; "
                    "start it with CUDA_VISIBLE_DEVICES set to that index and "
                    "CUDA_DEVICE_ORDER=PCI_BUS_ID")
            return row[2]
    raise ConfigError(f"nvidia-smi lists no GPU with index {gpu_index} "
                      f"(it lists {', '.join(r[0] for r in rows) or 'none'})")
