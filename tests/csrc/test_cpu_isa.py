"""The instruction-set dispatch of the CPU kernels' hot loops (csrc/cpu/isa.h, isa.cpp).

Each variant's numbers are checked against the formulas in test_cpu_kernels.py (which runs every
test once per variant this CPU runs); here: the choice at load, the $ATEN_CPU_CAPABILITY cap, the
switch's errors, what `python -m rla_ext.info` reports, and that the variants agree with each other
at a realistic stage shape where the vector loops (not their tails) carry the work.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rla_ext import _extension

pytestmark = pytest.mark.skipif(not _extension.cpp_compiled(),
                                reason=f"rla_ext._C has no CPU kernels ({_extension.load_error() or 'not built'})")

OPS = torch.ops.rla_ext
ISAS = ("default", "avx2", "avx512")


def runnable() -> tuple[str, ...]:
    return ISAS[:ISAS.index(OPS.cpu_isa_supported()) + 1]


def _child_isa(env_cap: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if env_cap is not None:
        env["ATEN_CPU_CAPABILITY"] = env_cap
    out = subprocess.run([sys.executable, "-m", "rla_ext.info"], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)["cpu"]


def test_load_picks_the_best_supported_variant():
    cpu = _child_isa(None)
    assert cpu["kernels_isa"] == cpu["kernels_isa_supported"] == OPS.cpu_isa_supported()
    # Our detection and ATen's agree on what the CPU runs (ATen says AVX512 / AVX2 / DEFAULT).
    assert cpu["torch_isa"].lower() == cpu["kernels_isa_supported"]


@pytest.mark.parametrize("cap", ISAS)
def test_aten_cpu_capability_caps_the_variant(cap):
    cpu = _child_isa(cap)
    want = ISAS[min(ISAS.index(cap), ISAS.index(OPS.cpu_isa_supported()))]
    assert cpu["kernels_isa"] == want
    assert cpu["isa_caps"] == {"ATEN_CPU_CAPABILITY": cap}


def test_set_cpu_isa_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="one of 'default', 'avx2', 'avx512'"):
        OPS.set_cpu_isa("sse2")
    best = OPS.cpu_isa_supported()
    if best != "avx512":
        with pytest.raises(RuntimeError, match="cannot run"):
            OPS.set_cpu_isa("avx512")
    assert OPS.cpu_isa() in ISAS


def test_set_cpu_isa_returns_previous_and_switches():
    start = OPS.cpu_isa()
    try:
        assert OPS.set_cpu_isa("default") == start
        assert OPS.cpu_isa() == "default"
    finally:
        OPS.set_cpu_isa(start)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_variants_agree_at_a_stage_shape(fmt):
    """fp32 results of every variant within a few ulps of the baseline's (FMA contraction and the
    vector tanh differ only in rounding)."""
    gen = torch.Generator().manual_seed(0)
    n, c, k, co, hw = 2, 64, 32, 48, 17
    x = torch.randn(n, c, hw, hw, generator=gen).contiguous(memory_format=fmt)
    h = torch.randn(n, k, hw, hw, generator=gen).contiguous(memory_format=fmt)
    w = torch.randn(co, c + k, generator=gen) * 0.1
    w_out, w_rec = torch.randn(k, c, generator=gen) * 0.1, torch.randn(k, k, 3, 3, generator=gen) * 0.1
    g, b = torch.rand(co, generator=gen) + 0.5, torch.randn(co, generator=gen)
    gk, bk = torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen)
    up_a = torch.randn(n, co, hw, hw, generator=gen).contiguous(memory_format=fmt)
    up_b = torch.randn(n, k, hw, hw, generator=gen).contiguous(memory_format=fmt)

    def run():
        out, z, m, v = OPS.concat_conv_bn_act_kernel_fwd(x, h, w, g, b, None, None, 1e-5, True)
        grads_a = OPS.concat_conv_bn_act_kernel_bwd(up_a, x, h, w, g, b, z, m, v, 1e-5, True, True)
        hn, s, mk, vk = OPS.rla_update_kernel_fwd(h, x, w_out, gk, bk, None, None, w_rec, False, 1e-5)
        grads_b = OPS.rla_update_kernel_bwd(up_b, h, x, w_out, gk, bk, w_rec, s, mk, vk, False, 1e-5, True)
        return (out, m, v, *grads_a, hn, mk, vk, *grads_b)

    start = OPS.cpu_isa()
    try:
        results = {}
        for isa in runnable():
            OPS.set_cpu_isa(isa)
            results[isa] = run()
    finally:
        OPS.set_cpu_isa(start)
    base = results["default"]
    for isa, res in results.items():
        for i, (got, want) in enumerate(zip(res, base)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()),
                                       msg=lambda m: f"{isa} vs default, result {i}: {m}")


@pytest.mark.isa_sensitive
@pytest.mark.skipif("RLA_EXT_EXPECT_TORCH_ISA" not in os.environ,
                    reason="only meaningful in scripts/test_lower_isa.py's forced-ISA rerun, which sets it")
def test_forced_lower_isa_took_effect():
    """The rerun really ran torch's and our kernels one ISA down (a cap that silently did nothing would
    make the rerun a copy of the first run)."""
    want = os.environ["RLA_EXT_EXPECT_TORCH_ISA"]
    assert torch.backends.cpu.get_cpu_capability() == want
    assert OPS.cpu_isa() == want.lower()
