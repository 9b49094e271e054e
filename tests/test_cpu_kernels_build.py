"""The CPU kernels build wherever a C++ compiler exists: test_cpu_kernels.py skips without
them, so a .cpp that stops compiling must fail here instead of turning into skips."""
import os

import pytest

from kernels import cpu


@pytest.mark.skipif(cpu._compiler() is None, reason="no C++ compiler on this machine")
@pytest.mark.skipif(os.environ.get("KVSERVE_DISABLE_CPU_KERNELS") == "1",
                    reason="disabled on purpose")
def test_kernels_build_where_a_compiler_exists():
    assert cpu.available(), cpu.unavailable_reason()
