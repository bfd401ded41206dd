"""The CPU kernel libraries this machine can run, and a fixture that forces each in turn.

``isa`` sets NMKERN_CPU_ISA and reloads nmkern._cpu's library (``_cpu._reset()``), so a test
taking it runs once per runnable library (generic, avx2, avx512). Import both names into a
test module: ``from _cpu_isa import ISAS, isa``.
"""

from __future__ import annotations

import pytest

from nmkern import _cpu


def _runnable_isas() -> list[str]:
    if not _cpu.available():
        return []
    gen = _cpu._open(_cpu.CpuIsa.GENERIC)
    isas = ["generic"]
    if gen.nmkern_cpu_supports_avx2() and _cpu._lib_path(_cpu.CpuIsa.AVX2).exists():
        isas.append("avx2")
    if gen.nmkern_cpu_supports_avx512() and _cpu._lib_path(_cpu.CpuIsa.AVX512).exists():
        isas.append("avx512")
    return isas


ISAS = _runnable_isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("NMKERN_CPU_ISA", request.param)
    _cpu._reset()
    assert _cpu.available() and _cpu.isa().value == request.param
    yield request.param
    monkeypatch.delenv("NMKERN_CPU_ISA")
    _cpu._reset()
