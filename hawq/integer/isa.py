"""What the CPU can do for integer kernels, read once per process.

``flags()`` reads ``/proc/cpuinfo`` (empty off Linux); :func:`describe` names the families
that matter for INT8 (AMX, AVX-512 VNNI, AVX-VNNI, AVX2) and the cap oneDNN runs under
(``ONEDNN_MAX_CPU_ISA``, which hides ISAs from oneDNN only, not from our own C++ kernels).
"""

from __future__ import annotations

import functools
import os
import platform
import re

# oneDNN's cap names, fastest INT8 family first, and the cpuinfo flags each one needs
ONEDNN_CAPS = {
    "AVX512_CORE_AMX": ("amx_int8", "amx_tile"),
    "AVX512_CORE_VNNI": ("avx512_vnni",),
    "AVX2_VNNI": ("avx_vnni",),
    "AVX2": ("avx2",),
}


@functools.lru_cache(maxsize=1)
def flags() -> frozenset[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return frozenset()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(m.group(1).split()) if m else frozenset()


@functools.lru_cache(maxsize=1)
def model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.MULTILINE)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def supported_caps() -> list[str]:
    """The oneDNN caps this CPU can run (each one an INT8 family), fastest first."""
    have = flags()
    return [cap for cap, need in ONEDNN_CAPS.items() if all(f in have for f in need)]


def family() -> str:
    """The fastest INT8 family of this CPU as oneDNN may use it (the cap applied)."""
    caps = supported_caps()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap in ONEDNN_CAPS:
        order = list(ONEDNN_CAPS)
        caps = [c for c in caps if order.index(c) >= order.index(cap)]
    return caps[0] if caps else "none"


def describe() -> dict[str, str | list[str]]:
    """CPU model, INT8 families it has, the cap in force and the family oneDNN uses."""
    return {
        "cpu": model_name(),
        "families": supported_caps(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "family_used": family(),
    }
