"""The planner on real TPU compilers (libtpu, compile only: no TPU here): test_tiny's train and
sample steps for a v5e 2x2 (`v5litepod-4`) and a v4 megacore (`v4-8`) slice; the slice table;
the collectives parser; the user errors."""
import json
import subprocess
import sys
import textwrap

import pytest

from glide_jax import plan, tpu

needs_libtpu = pytest.mark.skipif(not tpu.libtpu_available(),
                                  reason=f"libtpu is not installed ({tpu.INSTALL_HINT})")

SLICES = ("v5litepod-4", "v4-8")
# Every plan of the four, from one subprocess: one process start and one libtpu load for all
# compiles (~4 x 10-40 s here); also checks that every slice's topology has its table's hosts.
SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    from glide_jax import host, plan, tpu
    host.pin_cpu_platform()
    hosts = {name: len({d.process_index for d in tpu.compile_devices(s)})
             for name, s in tpu.SLICES.items()}
    out = {"hosts": hosts, "plans": {}}
    hlo_dir, slices = sys.argv[1], sys.argv[2:]
    for slc in slices:
        for program in ("train", "sample"):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = plan.main(["--config", "test_tiny", "--tpu", slc, "--program", program, "--json",
                                "--hlo", f"{hlo_dir}/{slc}-{program}.hlo"])
            out["plans"][f"{slc}/{program}"] = json.loads(buf.getvalue()) if rc == 0 else rc
    buf = io.StringIO()  # the fastest compile XLA offers (train.compiler_effort), last: each plan sets its own
    with contextlib.redirect_stdout(buf):
        rc = plan.main(["--config", "test_tiny", "--tpu", slices[0], "--json", "--set", "train.compiler_effort=-1"])
    out["fast"] = json.loads(buf.getvalue()) if rc == 0 else rc
    print(json.dumps(out))
""")

FIELDS = ("backend", "slice", "chips", "hosts", "mesh", "hbm_bytes_per_chip", "hbm", "hbm_capacity_bytes", "fits",
          "compile_s", "host_peak_rss_bytes", "flops_per_chip", "bytes_accessed_per_chip", "roofline_s",
          "roofline_mfu", "hbm_traffic_bytes_per_chip", "hbm_roofline_s", "hbm_roofline_mfu", "collectives",
          "all_to_all", "hbm_traffic")
# jax primitives whose sharding changes the partitioner implements with all-to-alls in these programs
# (plan.all_to_all_sources, docs/tpu.md): matmuls with an FSDP-split contracting dimension and the
# elementwise ops beside them, gradient sums of replicated parameters, CFG's row concatenation.
EXPLAINED_ALL_TO_ALL = {"dot_general", "mul", "add_any", "select_n", "concatenate", "reduce_sum",
                        "conv_general_dilated", "transpose", "reshape", "convert_element_type"}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    hlo_dir = tmp_path_factory.mktemp("hlo")
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(hlo_dir), *SLICES], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(json.loads(p.stdout.strip().splitlines()[-1]), hlo_dir=hlo_dir)


@needs_libtpu
def test_compiler_effort_reaches_the_tpu_compiler(plans):
    """`train.compiler_effort=-1` compiles another program (other machine code) of the same step (same FLOPs)."""
    fast, default = plans["fast"], plans["plans"][f"{SLICES[0]}/train"]
    assert isinstance(fast, dict), f"plan exited {fast}"
    assert (fast["compiler_effort"], default["compiler_effort"]) == (-1.0, 0.0)
    assert fast["fits"] and fast["flops_per_chip"] == pytest.approx(default["flops_per_chip"], rel=0.02)
    assert fast["hbm"]["generated_code"] != default["hbm"]["generated_code"]
    # at the default effort the compiler keeps buffers in on-chip memory (memory-space assignment);
    # at -1 it does not (docs/tpu.md, "On-chip memory"): all but scalars and sync flags are in HBM
    fast_t, default_t = fast["hbm_traffic"], default["hbm_traffic"]
    assert fast_t["hbm_bytes"] >= 0.99 * fast_t["bytes"], fast_t
    assert default_t["hbm_bytes"] < 0.8 * default_t["bytes"], default_t


@needs_libtpu
def test_topologies_have_the_tables_hosts(plans):
    assert plans["hosts"] == {n: s.hosts for n, s in tpu.SLICES.items()}


@needs_libtpu
@pytest.mark.parametrize("slc", SLICES)
@pytest.mark.parametrize("program", ("train", "sample"))
def test_test_tiny_on_tpu(plans, slc, program):
    r = plans["plans"][f"{slc}/{program}"]
    assert isinstance(r, dict), f"plan exited {r}"
    s = tpu.get_slice(slc)
    assert not [f for f in FIELDS if f not in r]
    assert r["backend"] == "tpu" and r["slice"] == slc and r["chips"] == s.chips == 4 and r["hosts"] == 1
    assert r["fits"] and 0 < r["hbm_bytes_per_chip"] <= r["hbm_capacity_bytes"] == s.chip.hbm_bytes
    h = r["hbm"]
    assert r["hbm_bytes_per_chip"] == h["arguments"] + h["outputs"] - h["aliased"] + h["temp"]
    if program == "train":  # FSDP: every chip holds a quarter of the parameters
        assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
        assert h["params"] == pytest.approx(r["params_bytes_unsharded"] / 4, rel=0.15)
        assert h["aliased"] > 0  # the donated state
    else:  # sampling replicates the weights and splits the 2 x 8 CFG rows over the chips
        assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and r["model_rows"] == 16
        assert h["params"] == r["params_bytes_unsharded"]
    assert r["flops_per_chip"] > 0 and r["bytes_accessed_per_chip"] > 0
    assert r["roofline_s"] == pytest.approx(max(r["flops_per_chip"] / s.chip.peak_flops,
                                                r["bytes_accessed_per_chip"] / s.chip.hbm_bandwidth))
    assert 0 < r["roofline_mfu"] <= 1
    assert r["compile_s"] > 0 and r["host_peak_rss_bytes"] > 2**27
    # all-to-alls: absent, or small exchanges at the explained primitives (not parameter traffic)
    a2a, coll = r["all_to_all"], r["collectives"]
    assert a2a["count"] == coll.get("all-to-all", {}).get("count", 0)
    assert set(a2a["by_primitive"]) <= EXPLAINED_ALL_TO_ALL, a2a
    # the traffic breakdown brackets the compiler's own bytes-accessed figure: tile padding counted or not
    traffic = r["hbm_traffic"]
    assert 0.8 * traffic["unpadded_bytes"] <= r["compiler_bytes_accessed_per_chip"] <= 1.2 * traffic["bytes"], traffic
    assert sum(traffic["by_kind"].values()) == traffic["bytes"] >= sum(t["bytes"] for t in traffic["top"])
    assert 0 < traffic["hbm_bytes"] == sum(traffic["hbm_by_kind"].values()) <= traffic["bytes"]
    assert r["hbm_traffic_bytes_per_chip"] == traffic["hbm_bytes"] * r["loop_scale"]
    assert r["hbm_roofline_s"] == pytest.approx(max(r["compute_s"], r["hbm_traffic_bytes_per_chip"] /
                                                    s.chip.hbm_bandwidth))
    assert 0 < r["hbm_roofline_mfu"] <= 1
    # --hlo wrote the compiled module the figures come from: its collectives are the ones counted
    hlo = (plans["hlo_dir"] / f"{slc}-{program}.hlo").read_text()
    assert hlo.startswith("HloModule") and plan.collectives(hlo) == coll
    if program == "train":
        assert coll["all-gather"]["count"] > 0  # FSDP gathers the weights
        assert a2a["bytes"] < 0.05 * coll["all-gather"]["bytes"]


@needs_libtpu
def test_text_reports_show_both_rooflines(plans):
    """The plan's and the search's text output name the roofline by the cost analysis and the one over
    HBM accesses only, with the plan's own figures."""
    r = plans["plans"][f"{SLICES[0]}/train"]
    text = plan.format_tpu(r, "test_tiny")
    assert f"roofline {r['roofline_s'] * 1e3:.2f} ms" in text
    assert f"{r['hbm_traffic_bytes_per_chip'] / 1e9:,.2f} GB -> roofline {r['hbm_roofline_s'] * 1e3:.2f} ms" in text
    table = plan.format_search([plan.summary(r)], "test_tiny", tpu.get_slice(SLICES[0]), r["batch"])
    assert "HBM-only ms" in table and f"{r['hbm_roofline_s'] * 1e3:.1f}" in table.splitlines()[2]


def test_slice_table():
    v4 = tpu.get_slice("v4-8")
    assert (v4.chips, v4.hosts, v4.topology, v4.topology_kwargs()) == (4, 1, "v4:2x2x1",
                                                                        {"chip_config_name": "megacore"})
    assert (tpu.get_slice("v4-32").chips, tpu.get_slice("v4-32").hosts) == (16, 4)
    v5p = tpu.get_slice("v5p-128")
    assert (v5p.chips, v5p.hosts, v5p.topology) == (64, 16, "v5p:4x4x4")
    v5e = tpu.get_slice("v5litepod-4")
    assert (v5e.chips, v5e.hosts, v5e.topology, v5e.topology_kwargs()) == (4, 1, "v5e:2x2", {})
    assert tpu.get_slice("v5litepod-8").topology_kwargs() == {"chips_per_host_bounds": [2, 4, 1]}
    assert (tpu.get_slice("v5litepod-16").hosts, tpu.get_slice("v6e-8").hosts, tpu.get_slice("v6e-256").hosts) \
        == (4, 1, 64)
    assert tpu.get_slice(" V6E-8 ").chip is tpu.CHIPS["v6e"]
    assert tpu.CHIPS["v5e"].hbm_bytes == 16 * 2**30 and tpu.CHIPS["v5p"].peak_flops == 459e12
    assert tpu.CHIPS["v4"].hbm_bandwidth == 1.2e12 and tpu.CHIPS["v6e"].hbm_bandwidth == 1.638e12
    for name, s in tpu.SLICES.items():
        cores = int(name.rsplit("-", 1)[1])
        assert s.chips == (cores // 2 if s.chip.megacore else cores)
        assert s.chips == eval(s.shape.replace("x", "*"))
    with pytest.raises(tpu.SliceError, match="known: v4-8, v4-16"):
        tpu.get_slice("v5e-4")


def test_collectives_parser():
    hlo = textwrap.dedent("""
        %ag-start = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(bf16[4,8]{1,0} %p), dimensions={0}
        %ag-done = bf16[16,8]{1,0:T(8,128)(2,1)} all-gather-done((bf16[4,8]{1,0}, bf16[16,8]{1,0}) %ag-start)
        %all-reduce.1 = (f32[10]{0}, f32[2,3]{1,0}) all-reduce(f32[10]{0} %a, f32[2,3]{1,0} %b), to_apply=%add
        ROOT %all-to-all.2 = f32[4,1,128]{2,1,0} all-to-all(%x), dimensions={0}, metadata={op_name="A/transpose(B)/mul"}
        %fusion.3 = f32[8]{0} fusion(%all-reduce.1), kind=kLoop, calls=%fused_computation
    """)
    assert plan.collectives(hlo) == {"all-gather": {"count": 1, "bytes": 16 * 8 * 2},
                                     "all-reduce": {"count": 1, "bytes": 4 * 16},
                                     "all-to-all": {"count": 1, "bytes": 4 * 128 * 4}}
    a2a = plan.all_to_all_sources(hlo)
    assert (a2a["count"], a2a["backward"], a2a["by_primitive"]) == (1, 1, {"mul": 1})


def test_hbm_traffic_adds_up_to_the_compilers_bytes_accessed():
    import jax
    import jax.numpy as jnp

    def f(a, b, c, buf):
        image = jax.lax.conv_general_dilated(a[None, :, :, None], jnp.ones((3, 3, 1, 4)), (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        # an in-place update of a donated buffer: only the 8 updated rows move
        buf = jax.lax.dynamic_update_slice(buf, jnp.tanh(c[:8]), (jnp.argmax(a[0]) % 8, 0))
        return (jnp.tanh(a @ b) * c).sum(axis=0), image, buf

    x = jnp.ones((256, 256), jnp.float32)
    compiled = jax.jit(f, donate_argnums=3).lower(x, x, x, jnp.zeros((4096, 256))).compile()
    r = plan.hbm_traffic(compiled.as_text())
    assert r["bytes"] == pytest.approx(compiled.cost_analysis()["bytes accessed"], rel=0.02)
    # the convolution reads a and writes 4 channels of it; the matmul (fused or not) reads a and b
    kinds = r["by_kind"]
    assert sum(b for k, b in kinds.items() if "convolution" in k) >= 5 * 256 * 256 * 4, kinds
    assert sum(b for k, b in kinds.items() if "dot" in k) >= 2 * 256 * 256 * 4, kinds
    assert {t["op_name"] for t in r["top"]} >= {"conv_general_dilated"}
    assert r["unpadded_bytes"] == r["bytes"]  # CPU layouts have no tiles


# A prefetch as the TPU compiler writes it: `a` copied from HBM into on-chip memory (S(1)), a
# fusion reading the on-chip copy and writing its result to HBM. Every array is 8 x 128 bf16, 2 KiB.
PREFETCH_HLO = """HloModule prefetch

%fused (p0: bf16[8,128]) -> bf16[8,128] {
  %p0 = bf16[8,128]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  ROOT %t = bf16[8,128]{1,0:T(8,128)(2,1)} tanh(%p0)
}

ENTRY %main (a: bf16[8,128]) -> bf16[8,128] {
  %a = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  %cs = (bf16[8,128]{1,0:T(8,128)(2,1)S(1)}, bf16[8,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%a)
  %cd = bf16[8,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%cs)
  ROOT %f = bf16[8,128]{1,0:T(8,128)(2,1)} fusion(%cd), kind=kLoop, calls=%fused
}
"""


def test_hbm_bytes_leave_out_on_chip_buffers():
    """Every access counts in `bytes` (the compiler's way); in `hbm_bytes` only the prefetch's read of
    `a` and the fusion's write: the copy into VMEM and the fusion's read from it stay on chip."""
    r = plan.hbm_traffic(PREFETCH_HLO)
    kib = 2048
    assert r["bytes"] == 4 * kib  # copy: read a, write the copy; fusion: read the copy, write its result
    assert r["hbm_bytes"] == 2 * kib
    assert r["hbm_by_kind"] == {"copy": kib, "fusion:elementwise": kib}
    assert plan._tiled_bytes("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}", hbm_only=True) == 0
    assert plan._tiled_bytes("bf16[8,128]{1,0:T(8,128)(2,1)S(0)}", hbm_only=True) == kib


def test_tiled_bytes_pad_the_minor_dimensions():
    assert plan._tiled_bytes("f32[8,32]{1,0:T(8,128)}") == 8 * 128 * 4  # 32 channels stored as 128
    assert plan._tiled_bytes("bf16[3,5,256]{2,1,0:T(8,128)(2,1)}") == 3 * 8 * 256 * 2
    # minor-to-major 3,1,2,0: dim 3 (32) pads to 128, dim 1 (16) is already a multiple of 8
    assert plan._tiled_bytes("f32[16,16,3,32]{3,1,2,0:T(8,128)}") == 16 * 16 * 3 * 128 * 4
    assert plan._tiled_bytes("f32[10]{0}") == plan._shape_bytes("f32[10]{0}") == 40
    assert plan._tiled_bytes("(f32[4]{0:T(128)}, s32[])") == 128 * 4 + 4


def test_search_meshes():
    meshes = plan._meshes(4, 8)
    assert meshes[0] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert {"data": 4, "fsdp": 1, "tensor": 1} in meshes and {"data": 1, "fsdp": 1, "tensor": 4} in meshes
    assert all(m["data"] * m["fsdp"] * m["tensor"] == 4 for m in meshes)
    assert plan._meshes(4, 2) == [m for m in meshes if 2 % (m["data"] * m["fsdp"]) == 0]


def test_bad_slice_exits_2_with_the_list():
    p = subprocess.run([sys.executable, "-m", "glide_jax.plan", "--config", "test_tiny", "--tpu", "v9-8"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown TPU slice 'v9-8'")
    assert all(name in lines[0] for name in ("v4-8", "v5litepod-4", "v5p-128", "v6e-8"))


def test_without_libtpu_exits_2_with_the_install_hint(monkeypatch, capsys):
    monkeypatch.setattr(tpu, "libtpu_available", lambda: False)
    assert plan.main(["--config", "test_tiny", "--tpu", "v5litepod-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "pip install '.[tpu]'" in err[0]
