"""The Pallas SSD kernel (interpret mode on CPU) against the sequential reference,
plus ahead-of-time lowering for TPU (Mosaic) and GPU (Triton)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hybridvlm
from hybridvlm.cache import Layout
from hybridvlm.ssd.pallas.layout import round_to_bf16, truncate_to_tf32
from hybridvlm.ssd.pallas import GPU_PLAN, TPU_PLAN, TilePlan, ssd_pallas
from hybridvlm.layers.mamba2 import Mamba2Mixer
from hybridvlm.ssd import resolve_impl, ssd_sequential

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "nemotron_h")
# float32: errors are relative to the output scale (max |y|).
F32_TOL = 2e-5
# bfloat16 inputs are widened to float32 inside the kernels; against the
# float32 reference on the same (rounded) values the error stays float32-sized.
BF16_TOL = 2e-5
GRAD_TOL = 1e-4
# bfloat16 cotangents: rounding to 8 mantissa bits (2^-8 = 3.9e-3 relative).
BF16_GRAD_TOL = 8e-3
# Reduced-precision matmul passes (precision="default" on TPU / GPU), emulated on
# CPU. u = largest relative error of one rounded operand: bf16 (8 significant
# bits, to nearest) 2^-8; TF32 (11 significant bits, truncated: the worse of the
# GPU roundings) 2^-10. An output goes through at most two chained dots that each
# round both of their operands (C B^T, then that times x; x^T B w, then C S^T):
# each of its products carries at most ~4u, so without cancellation the error is
# within 4u of the output scale (measured: up to 1.0u for bf16, 1.6u for TF32,
# whose truncation errors all lean one way). Gradients chain one dot more
# (dy x^T, then with C or B) and dA is a global sum with cancellation: 8u
# (measured: up to 2.1u).
UNIT_ROUNDING = {"emulate_bf16": 2.0**-8, "emulate_tf32": 2.0**-10}
EMULATED_TOL = {name: 4 * u for name, u in UNIT_ROUNDING.items()}
EMULATED_GRAD_TOL = {name: 8 * u for name, u in UNIT_ROUNDING.items()}


def _inputs(seed, b, l, h, p, g, n, *, init=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, l, h, p)).astype(np.float32)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), size=(b, l, h))).astype(np.float32)
    A = -np.exp(rng.uniform(0, 2, size=h)).astype(np.float32)
    B = rng.normal(size=(b, l, g, n)).astype(np.float32)
    C = rng.normal(size=(b, l, g, n)).astype(np.float32)
    s0 = rng.normal(size=(b, h, p, n)).astype(np.float32) if init else None
    return x, dt, A, B, C, s0


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)


@pytest.mark.parametrize("plan", [TPU_PLAN, GPU_PLAN], ids=["tpu_plan", "gpu_plan"])
@pytest.mark.parametrize(
    "l,g,init",
    [(37, 2, True), (37, 1, False), (64, 2, False), (1, 2, True)],
)
def test_forward_matches_sequential(plan, l, g, init):
    x, dt, A, B, C, s0 = _inputs(0, 2, l, 4, 8, g, 16, init=init)
    y, final = jax.jit(lambda *a: ssd_pallas(*a[:5], chunk_size=8, initial_state=a[5], plan=plan))(x, dt, A, B, C, s0)
    y_ref, final_ref = ssd_sequential(x, dt, A, B, C, initial_state=s0)
    assert y.shape == (2, l, 4, 8) and final.shape == (2, 4, 8, 16)
    assert _rel_err(y, y_ref) <= F32_TOL
    assert _rel_err(final, final_ref) <= F32_TOL


def test_odd_dims_are_padded_exactly():
    # head_dim 5, d_state 7, chunk 6 (not a multiple of 8), 6 heads in 3 groups.
    x, dt, A, B, C, s0 = _inputs(1, 2, 23, 6, 5, 3, 7)
    y, final = ssd_pallas(x, dt, A, B, C, chunk_size=6, initial_state=s0)
    y_ref, final_ref = ssd_sequential(x, dt, A, B, C, initial_state=s0)
    assert _rel_err(y, y_ref) <= F32_TOL and _rel_err(final, final_ref) <= F32_TOL


def test_tile_plan_padding_rules():
    assert TPU_PLAN.pad_dim(80, 128) == 128 and TPU_PLAN.pad_dim(128, 128) == 128
    assert TPU_PLAN.pad_dim(130, 128) == 256
    assert GPU_PLAN.pad_dim(80, 16) == 128 and GPU_PLAN.pad_dim(5, 16) == 16
    assert TilePlan(8, 8, pow2=False, ordered_grid=True).pad_dim(5, 8) == 8


def test_bfloat16_inputs_accumulate_in_float32():
    x, dt, A, B, C, s0 = _inputs(2, 2, 37, 4, 8, 2, 16)
    xb, Bb, Cb = (jnp.asarray(v, jnp.bfloat16) for v in (x, B, C))
    y, final = ssd_pallas(xb, dt, A, Bb, Cb, chunk_size=8, initial_state=s0)
    assert y.dtype == jnp.float32 and final.dtype == jnp.float32
    widen = lambda v: np.asarray(v.astype(jnp.float32))
    y_ref, final_ref = ssd_sequential(widen(xb), dt, A, widen(Bb), widen(Cb), initial_state=s0)
    assert _rel_err(y, y_ref) <= BF16_TOL and _rel_err(final, final_ref) <= BF16_TOL


def _grads(fn, args, seed=7):
    """Gradients of a random linear loss on (y, final state) with respect to all six inputs."""
    x, s0 = args[0], args[5]
    rng = np.random.default_rng(seed)
    wy = rng.normal(size=x.shape).astype(np.float32)
    ws = rng.normal(size=s0.shape).astype(np.float32)

    def loss(*a):
        y, s = fn(*a)
        return jnp.sum(y * wy) + jnp.sum(s * ws)

    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)


_NAMES = ("x", "dt", "A", "B", "C", "s0")
_sequential = lambda x, dt, A, B, C, s0: ssd_sequential(x, dt, A, B, C, initial_state=s0)


@pytest.mark.parametrize("backward", ["pallas", "chunked"])
@pytest.mark.parametrize("plan", [TPU_PLAN, GPU_PLAN], ids=["tpu_plan", "gpu_plan"])
@pytest.mark.parametrize("l,g,cs", [(21, 2, 8), (37, 1, 8), (64, 4, 16), (1, 2, 8)])
def test_gradients_match_sequential(backward, plan, l, g, cs):
    # Lengths below, at and past a chunk boundary; g = 4 means one head per group.
    args = _inputs(3, 2, l, 4, 8, g, 16)
    pallas = lambda x, dt, A, B, C, s0: ssd_pallas(
        x, dt, A, B, C, chunk_size=cs, initial_state=s0, plan=plan, backward=backward)
    got, want = _grads(pallas, args), _grads(_sequential, args)
    for name, a, b, primal in zip(_NAMES, got, want, args):
        assert a.shape == primal.shape and a.dtype == primal.dtype, name
        assert np.abs(np.asarray(b)).max() > 0, name
        assert _rel_err(a, b) <= GRAD_TOL, name


def test_gradients_with_odd_dims():
    # head_dim 5, d_state 7, chunk 6 padded to 8, 6 heads in 3 groups: padding
    # must not leak into any cotangent.
    args = _inputs(4, 2, 23, 6, 5, 3, 7)
    pallas = lambda x, dt, A, B, C, s0: ssd_pallas(x, dt, A, B, C, chunk_size=6, initial_state=s0)
    for name, a, b in zip(_NAMES, _grads(pallas, args), _grads(_sequential, args)):
        assert _rel_err(a, b) <= GRAD_TOL, name


def test_bfloat16_gradients():
    # Cotangents of bfloat16 inputs come back in bfloat16: the kernels accumulate
    # in float32, so the error is the final rounding (2^-8 relative) plus float32 noise.
    x, dt, A, B, C, s0 = _inputs(5, 2, 29, 4, 8, 2, 16)
    xb, Bb, Cb = (jnp.asarray(v, jnp.bfloat16) for v in (x, B, C))
    pallas = lambda x, dt, A, B, C, s0: ssd_pallas(x, dt, A, B, C, chunk_size=8, initial_state=s0)
    got = _grads(pallas, (xb, dt, A, Bb, Cb, s0))
    widen = lambda v: np.asarray(v.astype(jnp.float32))
    want = _grads(_sequential, (widen(xb), dt, A, widen(Bb), widen(Cb), s0))
    for name, a, b in zip(_NAMES, got, want):
        tol = BF16_GRAD_TOL if name in ("x", "B", "C") else GRAD_TOL
        assert _rel_err(np.asarray(a, np.float32), b) <= tol, name
    assert got[0].dtype == jnp.bfloat16 and got[3].dtype == jnp.bfloat16


# ------------------------------------------------------- matmul precision
def test_operand_roundings():
    v = jnp.asarray([1 + 2.0**-8 + 2.0**-12, 1 + 2.0**-9 + 2.0**-10 + 2.0**-20, -3.0], jnp.float32)
    # bf16 keeps 7 stored mantissa bits, to nearest (ties to even); TF32 keeps 10, truncated.
    np.testing.assert_array_equal(np.asarray(round_to_bf16(v)), [1 + 2.0**-7, 1.0, -3.0])
    np.testing.assert_array_equal(np.asarray(truncate_to_tf32(v)), [1 + 2.0**-8, 1 + 2.0**-9 + 2.0**-10, -3.0])


@pytest.mark.parametrize("precision,plan", [("emulate_bf16", TPU_PLAN), ("emulate_tf32", GPU_PLAN)],
                         ids=["tpu_bf16_passes", "gpu_tf32"])
def test_reduced_precision_stays_within_its_tolerance(precision, plan):
    """Outputs and gradients with every kernel dot at bf16 / TF32 operand precision.

    The exact modes ("default" and "highest" compute exact float32 dots on CPU)
    stay within F32_TOL / GRAD_TOL, far tighter; the emulated error is also
    checked to be of the emulated size, so the emulation cannot silently vanish.
    """
    args = _inputs(6, 2, 37, 4, 8, 2, 16)
    fn = lambda x, dt, A, B, C, s0: ssd_pallas(x, dt, A, B, C, chunk_size=8, initial_state=s0, plan=plan,
                                               precision=precision)
    y, final = jax.jit(fn)(*args)
    y_ref, final_ref = _sequential(*args)
    u = UNIT_ROUNDING[precision]
    errors = {"y": _rel_err(y, y_ref), "final": _rel_err(final, final_ref)}
    errors.update({name: _rel_err(a, b) for name, a, b in zip(_NAMES, _grads(fn, args), _grads(_sequential, args))})
    for name, err in errors.items():
        tol = EMULATED_TOL[precision] if name in ("y", "final") else EMULATED_GRAD_TOL[precision]
        assert err <= tol, f"{name}: {err:.3g} > {tol:.3g}"
        assert err >= u / 10, f"{name}: {err:.3g}: rounding not applied?"


def test_precision_name_is_checked():
    args = _inputs(0, 1, 8, 2, 4, 1, 4)
    with pytest.raises(ValueError, match="precision"):
        ssd_pallas(*args[:5], chunk_size=8, precision="high")


def _dot_precisions(jaxpr):
    """(precision, preferred_element_type) of every dot_general inside the pallas_calls of a jaxpr."""
    out = []
    for call in _pallas_calls(jaxpr):
        kernel = call.params["jaxpr"]
        out += [(e.params["precision"], e.params["preferred_element_type"])
                for e in kernel.eqns if e.primitive.name == "dot_general"]
    return out


@pytest.mark.parametrize("precision,lax_precision", [("default", jax.lax.Precision.DEFAULT),
                                                     ("highest", jax.lax.Precision.HIGHEST)])
def test_every_kernel_dot_states_its_precision(precision, lax_precision):
    args = _inputs(0, 1, 20, 4, 8, 2, 16)
    loss = lambda *a: jnp.sum(ssd_pallas(*a[:5], chunk_size=8, initial_state=a[5], precision=precision)[0])
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=tuple(range(6))))(*args).jaxpr
    dots = _dot_precisions(jaxpr)
    # Forward: 3 (chunk-local) + 1 (readout); backward: 2 (states) + 9 (gradients).
    assert len(dots) == 15
    assert set(dots) == {((lax_precision, lax_precision), jnp.dtype(jnp.float32))}


def _pallas_calls(jaxpr):
    """Every pallas_call equation in a jaxpr, nested ones included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _pallas_calls(inner)


@pytest.mark.parametrize("plan,rows", [(TPU_PLAN, 2), (GPU_PLAN, 4)], ids=["tpu_plan", "gpu_plan"])
def test_backward_group_sum_where_grid_is_ordered(plan, rows):
    # 4 heads in 2 groups: on TPU dB and dC accumulate per group in the kernel;
    # on GPU (parallel grid programs) they leave it per head.
    args = _inputs(0, 1, 20, 4, 8, 2, 16)
    loss = lambda *a: jnp.sum(ssd_pallas(*a[:5], chunk_size=8, initial_state=a[5], plan=plan)[0])
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(3, 4)))(*args).jaxpr
    (grads,) = [e for e in _pallas_calls(jaxpr) if e.params["name"] == "ssd_bwd_grads"]
    _, db, dc = grads.params["out_avals"][:3]
    assert db.shape[1] == dc.shape[1] == rows


def test_backward_name_is_checked():
    args = _inputs(0, 1, 8, 2, 4, 1, 4)
    with pytest.raises(ValueError, match="backward"):
        ssd_pallas(*args[:5], chunk_size=8, backward="triton")


def test_mixer_gradients_including_D(tiny_config):
    cfg_p = tiny_config(pattern="M", ssd_impl="pallas", chunk_size=8)
    cfg_s = cfg_p.replace(ssd_impl="sequential")
    mixer_p = Mamba2Mixer(cfg_p, rngs=nnx.Rngs(0))
    mixer_s = Mamba2Mixer(cfg_s, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 13, cfg_p.hidden_size))
    layout = Layout.prompt(jnp.ones((2, 13), bool))

    def loss(m):
        y, _ = m(x, layout)
        return jnp.sum(jnp.sin(y))

    gp = nnx.state(nnx.grad(loss)(mixer_p), nnx.Param)
    gs = nnx.state(nnx.grad(loss)(mixer_s), nnx.Param)
    flat_p, flat_s = dict(nnx.to_flat_state(gp)), dict(nnx.to_flat_state(gs))
    assert ("D",) in flat_p
    for path in flat_s:
        a, b = flat_p[path].get_value(), flat_s[path].get_value()
        assert _rel_err(a, b) <= GRAD_TOL, path


@pytest.mark.parametrize("case", ["hybrid_g2", "tied_g1_sharded"])
def test_model_logits_pallas_equal_chunked(case):
    d = os.path.join(FIXTURES, case)
    e = np.load(os.path.join(d, "expected.npz"))
    ids, mask = jnp.asarray(e["input_ids"]), jnp.asarray(e["attention_mask"])
    fwd = nnx.jit(lambda m, i, a: m(i, attention_mask=a))
    pallas = hybridvlm.from_pretrained(d, ssd_impl="pallas")
    assert pallas.config.ssd_impl == "pallas"
    got = np.asarray(fwd(pallas, ids, mask))
    want = np.asarray(fwd(hybridvlm.from_pretrained(d, ssd_impl="chunked"), ids, mask))
    valid = e["attention_mask"].astype(bool)
    assert np.abs(got - want)[valid].max() <= 1e-5
    assert np.abs(got - e["logits"])[valid].max() <= 1e-4


def test_auto_dispatch_by_backend():
    assert resolve_impl("auto", "tpu") == "pallas"
    assert resolve_impl("auto", "gpu") == "pallas"
    assert resolve_impl("auto", "cpu") == "chunked"
    assert resolve_impl("pallas", "cpu") == "pallas"


# ------------------------------------------------ lowering for accelerators
KERNELS = ("ssd_chunk_local", "ssd_state_readout", "ssd_bwd_states", "ssd_bwd_grads")


def _lower_for(platform, plan, precision):
    """Exports (lowers, without running) a Nemotron-H-12B-shaped SSD forward and
    backward for `platform`."""
    b, l, h, p, g, n = 1, 300, 8, 80, 2, 128  # 12B head dims; 300 = 2.3 chunks
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = (sds(b, l, h, p), sds(b, l, h), sds(h), sds(b, l, g, n), sds(b, l, g, n), sds(b, h, p, n))

    def loss(x, dt, A, B, C, s0):
        y, s = ssd_pallas(x, dt, A, B, C, chunk_size=128, initial_state=s0, interpret=False, plan=plan,
                          precision=precision)
        return jnp.sum(y) + jnp.sum(s)

    # value_and_grad keeps the forward kernels alive next to the backward ones.
    fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return jax.export.export(fn, platforms=[platform], disabled_checks=checks)(*args).mlir_module()


def test_kernels_lower_for_tpu(monkeypatch):
    # Mosaic asks the local device for TPU parameters; on a CPU host we name a
    # TPU v5e so the lowering (block shapes, tiling, ops) is checked here.
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
    modules = {p: _lower_for("tpu", TPU_PLAN, p) for p in ("default", "highest")}
    for module in modules.values():
        assert module.count("tpu_custom_call") == len(KERNELS)
        assert all(name in module for name in KERNELS)
    # The precision reaches the serialized kernels (Mosaic: fp32 contract precision or none).
    assert modules["default"] != modules["highest"]


def test_kernels_lower_for_gpu():
    modules = {p: _lower_for("cuda", GPU_PLAN, p) for p in ("default", "highest")}
    for module in modules.values():
        assert module.count("__gpu$xla.gpu.triton") == len(KERNELS)
        assert all(name in module for name in KERNELS)
    # The precision reaches the serialized kernels (Triton: TF32 or IEEE input precision).
    assert modules["default"] != modules["highest"]
