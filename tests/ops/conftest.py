"""Implementations under test. The host build of the CUDA source must exist when SAPO_REQUIRE_KERNELS=1 (set by
`make test`, which builds it first); elsewhere its tests skip when it is not built."""

import os

import pytest

from megatron_sapo.ops import is_available


def implementations(*, host_kernel=True):
    impls = ["torch"]
    if host_kernel:
        impls.append(pytest.param("host_kernel", marks=pytest.mark.host_kernel))
    return impls


@pytest.fixture(autouse=True)
def _host_kernel_library(request):
    if "host_kernel" not in request.keywords:
        return
    if not is_available("host_kernel"):
        if os.environ.get("SAPO_REQUIRE_KERNELS") == "1":
            pytest.fail("kernels/build/libsapo_kernels_host.so is missing: `make kernels` failed or did not run")
        pytest.skip("host build of the kernels not built (make kernels)")
