"""Mamba-2 mixer of Nemotron-H.

in_proj -> [z | xBC | dt]; causal depthwise conv1d (+bias) and SiLU on xBC;
dt = clamp(softplus(dt + dt_bias), time_step_limit); A = -exp(A_log);
SSD over heads with n_groups B/C groups; + D * x; group-wise gated RMSNorm
with z; out_proj.

Padding (attention_mask = 0) is zeroed before in_proj and after the conv,
as the reference does, so padded positions leave the SSM state untouched.

A sequence longer than `seq_block` tokens runs block after block, carrying
the conv inputs and the SSM state (the recurrence the cache already carries
from prefill to decode), so a long prefill's temporaries are one block's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybridvlm.cache import Layout, MambaState
from hybridvlm.config import LMConfig
from hybridvlm.layers.init import const_param, normal_param, zeros_param
from hybridvlm.layers.norm import GatedRMSNorm
from hybridvlm.ops.blocks import block_plan, map_blocks
from hybridvlm.ops.dense import dense
from hybridvlm.ssd import ssd, ssd_step


def causal_conv(xbc, weight, bias, prefix, end=None):
    """Depthwise causal conv over time.

    Args:
      xbc: (b, t, c) inputs; weight: (k, c) taps, oldest first; bias: (c,) or None.
      prefix: (b, k - 1, c) inputs preceding xbc (zeros at sequence start).
      end: None, or a traced count of real positions (the rest is padding).
    Returns:
      (b, t, c) outputs and the new prefix (b, k - 1, c): the last k - 1
      inputs (before `end`).
    """
    k = weight.shape[0]
    t = xbc.shape[1]
    full = jnp.concatenate([prefix.astype(xbc.dtype), xbc], axis=1)  # (b, k-1+t, c)
    # Sum of k shifted views: cheap for the small kernels Mamba uses (k = 4).
    out = sum(full[:, i : i + t] * weight[i] for i in range(k))
    if bias is not None:
        out = out + bias
    if end is not None:
        return out, jax.lax.dynamic_slice_in_dim(full, end, k - 1, axis=1)
    return out, full[:, full.shape[1] - (k - 1) :]


class Mamba2Mixer(nnx.Module):
    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        d, h, inner = cfg.hidden_size, cfg.mamba_num_heads, cfg.mamba_intermediate
        proj = inner + cfg.conv_dim + h
        self.in_proj = normal_param(rngs, (d, proj), ("embed", "mamba_proj"), dtype)
        self.in_proj_bias = zeros_param((proj,), ("mamba_proj",), dtype) if cfg.use_bias else None
        self.conv_weight = normal_param(rngs, (cfg.conv_kernel, cfg.conv_dim), ("conv_kernel", "mamba_conv"), dtype, std=0.2)
        self.conv_bias = zeros_param((cfg.conv_dim,), ("mamba_conv",), dtype) if cfg.use_conv_bias else None
        # dt_bias = softplus^-1 of steps log-uniform in [1e-3, 1e-1], A in [1, 16]:
        # the usual Mamba-2 init, so that a fresh model is numerically sane.
        key_dt, key_a = jax.random.split(rngs.params())
        dt0 = jnp.exp(jax.random.uniform(key_dt, (h,), minval=jnp.log(1e-3), maxval=jnp.log(1e-1)))
        self.dt_bias = const_param(dt0 + jnp.log(-jnp.expm1(-dt0)), ("mamba_heads",), dtype)
        self.A_log = const_param(jnp.log(jax.random.uniform(key_a, (h,), minval=1.0, maxval=16.0)), ("mamba_heads",), dtype)
        self.D = const_param(jnp.ones((h,)), ("mamba_heads",), dtype)
        self.norm = GatedRMSNorm(inner, groups=cfg.n_groups, eps=cfg.layer_norm_epsilon, dtype=dtype)
        self.out_proj = normal_param(rngs, (inner, d), ("mamba_inner", "embed"), dtype)
        self.out_proj_bias = zeros_param((d,), ("embed",), dtype) if cfg.use_bias else None

    def zero_state(self, batch: int, dtype) -> MambaState:
        cfg = self.cfg
        return MambaState(
            conv=jnp.zeros((batch, cfg.conv_kernel - 1, cfg.conv_dim), dtype),
            ssm=jnp.zeros((batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size), jnp.float32),
        )

    def project(self, x, layout: Layout, conv_prefix=None, end=None):
        """in_proj, causal conv and the SSM parameters for x's tokens.

        Args:
          x: (b, t, d) normed hidden states; layout: token validity.
          conv_prefix: (b, k - 1, conv_dim) inputs before x, or None (zeros).
          end: None, or a traced count of real positions in x: the positions
            after it are padding of the last sequence block, kept out of the
            state (dt = 0 there; the conv state is the inputs before `end`).
        Returns:
          dict(z (b, t, h * p), x (b, t, h, p), B, C (b, t, g, n),
               dt (b, t, h) float32 after softplus and clamp, A (h,) float32,
               conv_state (b, k - 1, conv_dim)).
        """
        cfg = self.cfg
        b = x.shape[0]
        h, g, n = cfg.mamba_num_heads, cfg.n_groups, cfg.ssm_state_size
        inner = cfg.mamba_intermediate
        keep = layout.valid[..., None]

        zxbcdt = dense("btd,de->bte", jnp.where(keep, x, 0).astype(x.dtype), self.in_proj[...])
        if self.in_proj_bias is not None:
            zxbcdt = zxbcdt + self.in_proj_bias[...]
        z, xbc, dt = jnp.split(zxbcdt, [inner, inner + cfg.conv_dim], axis=-1)

        prefix = self.zero_state(b, x.dtype).conv if conv_prefix is None else conv_prefix
        bias = None if self.conv_bias is None else self.conv_bias[...]
        xbc, conv_state = causal_conv(xbc, self.conv_weight[...], bias, prefix, end)
        xbc = jnp.where(keep, jax.nn.silu(xbc), 0).astype(x.dtype)
        xs, B, C = jnp.split(xbc, [inner, inner + g * n], axis=-1)

        lo, hi = cfg.time_step_limit
        dt = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)), lo, hi)
        if end is not None:
            dt = jnp.where((jnp.arange(x.shape[1]) < end)[:, None], dt, 0.0)
        return dict(
            z=z,
            x=rearrange(xs, "b t (h p) -> b t h p", h=h),
            B=rearrange(B, "b t (g n) -> b t g n", g=g),
            C=rearrange(C, "b t (g n) -> b t g n", g=g),
            dt=dt,
            A=-jnp.exp(self.A_log[...].astype(jnp.float32)),
            conv_state=conv_state,
        )

    def project_scoring(self, x, layout: Layout):
        """B, C (b, t, g, n) and dt (b, t, h) only, for token scoring.

        Equal to `project(...)`'s values (the conv is depthwise, so B and C
        need only their own channels) at a fraction of the cost: the z and x
        columns of in_proj, most of its width, are skipped.
        """
        cfg = self.cfg
        inner, g, n, h = cfg.mamba_intermediate, cfg.n_groups, cfg.ssm_state_size, cfg.mamba_num_heads
        bc = slice(2 * inner, 2 * inner + 2 * g * n)  # in_proj columns of B and C
        dtc = slice(inner + cfg.conv_dim, inner + cfg.conv_dim + h)
        keep = layout.valid[..., None]
        xm = jnp.where(keep, x, 0).astype(x.dtype)
        w = self.in_proj[...]
        proj_bc = dense("btd,de->bte", xm, w[:, bc])
        proj_dt = dense("btd,dh->bth", xm, w[:, dtc])
        if self.in_proj_bias is not None:
            proj_bc = proj_bc + self.in_proj_bias[...][bc]
            proj_dt = proj_dt + self.in_proj_bias[...][dtc]
        conv_ch = slice(inner, inner + 2 * g * n)  # the same channels within the conv
        bias = None if self.conv_bias is None else self.conv_bias[...][conv_ch]
        prefix = jnp.zeros((x.shape[0], cfg.conv_kernel - 1, 2 * g * n), x.dtype)
        bc_out, _ = causal_conv(proj_bc, self.conv_weight[...][:, conv_ch], bias, prefix)
        bc_out = jnp.where(keep, jax.nn.silu(bc_out), 0).astype(x.dtype)
        B, C = jnp.split(bc_out, 2, axis=-1)
        lo, hi = cfg.time_step_limit
        dt = jax.nn.softplus(proj_dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        return dict(
            B=rearrange(B, "b t (g n) -> b t g n", g=g),
            C=rearrange(C, "b t (g n) -> b t g n", g=g),
            dt=jnp.clip(dt, lo, hi),
            A=-jnp.exp(self.A_log[...].astype(jnp.float32)),
        )

    def __call__(self, x, layout: Layout, state: MambaState | None = None):
        """Runs the mixer over x's tokens.

        Args:
          x: (b, t, d) normed hidden states.
          layout: token validity (padding is masked).
          state: None for a sequence start without a returned state; else the
            state before x (zeros for a prefill), which is advanced over x.
        Returns:
          y (b, t, d) and the new MambaState (or None).
        """
        cfg = self.cfg
        b, t = x.shape[:2]
        if block_plan(t, cfg.seq_block, cfg.chunk_size)[0] == 1:
            return self._run(x, layout, state)
        # Blocks cut at chunk boundaries and carry the state from the first;
        # `real` marks the positions that are not padding of the last block.
        start = self.zero_state(b, x.dtype) if state is None else state

        def run(carry, xb, lb, real):
            yb, carry = self._run(xb, lb, carry, end=jnp.sum(real[0], dtype=jnp.int32))
            return carry, yb

        y, new_state = map_blocks(run, x, layout, jnp.ones((b, t), bool), block=cfg.seq_block,
                                  align=cfg.chunk_size, carry=start)
        return y, (None if state is None else new_state)

    def _run(self, x, layout: Layout, state: MambaState | None, end=None):
        """`__call__` on one block of tokens (`end`: see `project`)."""
        cfg = self.cfg
        t = x.shape[1]
        p_ = self.project(x, layout, None if state is None else state.conv, end)
        xs, B, C, dt, A = p_["x"], p_["B"], p_["C"], p_["dt"], p_["A"]
        ssm0 = None if state is None else state.ssm
        if t == 1 and ssm0 is not None:
            y, ssm = ssd_step(ssm0, xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
            y = y[:, None]
        else:
            y, ssm = ssd(xs, dt, A, B, C, chunk_size=cfg.chunk_size, initial_state=ssm0, impl=cfg.ssd_impl,
                         chunk_group=cfg.ssd_chunk_group, precision=cfg.ssd_precision)
        y = y + xs.astype(jnp.float32) * self.D[...].astype(jnp.float32)[:, None]
        y = rearrange(y, "b t h p -> b t (h p)")
        y = self.norm(y, p_["z"])
        out = dense("bte,ed->btd", y.astype(x.dtype), self.out_proj[...])
        if self.out_proj_bias is not None:
            out = out + self.out_proj_bias[...]
        if state is None:
            return out, None
        # A carried state keeps its dtypes from block to block.
        return out, MambaState(conv=p_["conv_state"].astype(state.conv.dtype), ssm=ssm)
