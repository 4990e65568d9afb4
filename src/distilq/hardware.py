"""What this machine's CPU is, as far as INT8 and FP32 speed and results depend on it."""

from __future__ import annotations

import functools
import os
import platform

# The ISA features that change which kernels torch and fbgemm run.
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]
    return {
        k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())
    }


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), or the platform's processor string."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """Which of `FEATURES` this CPU has."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in FEATURES if f in flags]


def describe_cpu(threads: int | None = None) -> str:
    """One line for reports: model, the features that matter, and the torch threads."""
    import torch

    threads = threads or torch.get_num_threads()
    features = ", ".join(cpu_features()) or "none of " + "/".join(FEATURES)
    return f"{cpu_model()} ({features}); {threads} of {os.cpu_count()} threads"


def platform_record(engine: str) -> dict:
    """What INT8 and FP32 results depend on here, for the manifest: the CPU, its ISA
    features, torch's kernel level (ATEN_CPU_CAPABILITY changes it), the quantized engine
    (or onnxruntime, then its version) and torch's version. `key` names the combination;
    machines with equal keys run the same kernels."""
    import hashlib

    import torch

    record = {
        "architecture": platform.machine(),
        "vendor": _cpuinfo().get("vendor_id", ""),
        "cpu": cpu_model(),
        "features": cpu_features(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "quantized_engine": engine,
        "torch": torch.__version__,
    }
    names = ["architecture", "torch_cpu_capability", "quantized_engine", "torch"]
    if engine == "onnxruntime":
        import onnxruntime

        record["onnxruntime"] = onnxruntime.__version__
        names.append("onnxruntime")
    kernels = [record[k] for k in names]
    digest = hashlib.sha256(" ".join([*kernels, *record["features"]]).encode()).hexdigest()
    record["key"] = (
        f"{record['architecture']}-{record['torch_cpu_capability'].lower()}-{digest[:8]}"
    )
    return record
