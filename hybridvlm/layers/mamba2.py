"""Mamba-2 mixer of Nemotron-H.

[z | x | B | C | dt] projections of the input; causal depthwise conv1d
(+bias) and SiLU on x, B and C; dt = clamp(softplus(dt + dt_bias),
time_step_limit); A = -exp(A_log); SSD over heads with n_groups B/C groups;
+ D * x; group-wise gated RMSNorm with z; out_proj.

HF checkpoints store the input projection fused (`in_proj`, columns
[z | x | B | C | dt]) and the conv fused over channels [x | B | C]. Here
each part is its own parameter (`z_proj` ... `dt_proj`, `conv_x` ...), so
tensor sharding splits each part along its own model-parallel dimension
(inner channels, B/C groups, heads) instead of cutting across parts; the
conv is depthwise, so running it per part is exact. `split_in_proj` /
`split_conv` and `fuse_in_proj` / `fuse_conv` convert between the layouts
(HF import and export). The decode state keeps the conv inputs fused
([x | B | C] channels, as HF's cache).

Padding (attention_mask = 0) is zeroed before the projections and after the
conv, as the reference does, so padded positions leave the SSM state
untouched.

A sequence longer than `seq_block` tokens runs block after block, carrying
the conv inputs and the SSM state (the recurrence the cache already carries
from prefill to decode), so a long prefill's temporaries are one block's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from hybridvlm.cache import Layout, MambaState
from hybridvlm.config import LMConfig
from hybridvlm.context.mamba import conv_halo, incoming_state, sharded_ssd_tail
from hybridvlm.layers.init import INIT_STD, const_param, normal_param, param, zeros_param
from hybridvlm.layers.norm import GatedRMSNorm
from hybridvlm.ops.blocks import block_plan, map_blocks
from hybridvlm.ops.dense import dense
from hybridvlm.ssd import ssd, ssd_step

# Parts of HF's fused in_proj output and conv channels, in their stored order.
PROJ_PARTS = ("z", "x", "B", "C", "dt")
CONV_PARTS = ("x", "B", "C")
GROUPED = ("B", "C")  # parts stored (..., groups, state)


def _part_widths(cfg: LMConfig, parts) -> list[int]:
    inner, gn, h = cfg.mamba_intermediate, cfg.n_groups * cfg.ssm_state_size, cfg.mamba_num_heads
    return [{"z": inner, "x": inner, "B": gn, "C": gn, "dt": h}[p] for p in parts]


def _split(fused, cfg: LMConfig, parts, only=None) -> dict:
    """Splits the last axis of `fused` (numpy or jax) into `parts` (or just
    the parts in `only`); B and C come back as (..., groups, state)."""
    widths = _part_widths(cfg, parts)
    if fused.shape[-1] != sum(widths):
        raise ValueError(f"fused Mamba axis has {fused.shape[-1]} channels, the config implies {sum(widths)}")
    out, lo = {}, 0
    for part, width in zip(parts, widths):
        if only is None or part in only:
            piece = fused[..., lo:lo + width]
            if part in GROUPED:
                piece = piece.reshape(*piece.shape[:-1], cfg.n_groups, cfg.ssm_state_size)
            out[part] = piece
        lo += width
    return out


def _fuse(pieces: dict, parts):
    """Inverse of `_split`: the parts concatenated on the last axis (numpy or jax arrays)."""
    flat = [pieces[p].reshape(*pieces[p].shape[:-2], -1) if p in GROUPED else pieces[p] for p in parts]
    xp = np if all(isinstance(f, np.ndarray) for f in flat) else jnp
    return xp.concatenate(flat, axis=-1)


def split_in_proj(fused, cfg: LMConfig, only=None) -> dict:
    """HF's fused in_proj (in our (d, proj) layout) or its bias (proj,) ->
    {"z", "x": (..., inner), "B", "C": (..., groups, state), "dt": (..., heads)}
    (only the parts named in `only`, if given)."""
    return _split(fused, cfg, PROJ_PARTS, only)


def split_conv(fused, cfg: LMConfig, only=None) -> dict:
    """Fused conv taps (k, conv_dim), bias (conv_dim,) or state (b, k - 1, conv_dim)
    -> {"x": (..., inner), "B", "C": (..., groups, state)} (or the parts in `only`)."""
    return _split(fused, cfg, CONV_PARTS, only)


def fuse_in_proj(pieces: dict):
    """Inverse of `split_in_proj`."""
    return _fuse(pieces, PROJ_PARTS)


def fuse_conv(pieces: dict):
    """Inverse of `split_conv`."""
    return _fuse(pieces, CONV_PARTS)


def causal_conv(u, weight, bias, prefix, end=None):
    """Depthwise causal conv over time, channel by channel.

    Args:
      u: (b, t, *c) inputs; weight: (k, *c) taps, oldest first; bias: (*c,) or None.
      prefix: (b, k - 1, *c) inputs preceding u (zeros at sequence start).
      end: None, or a traced count of real positions (the rest is padding).
    Returns:
      (b, t, *c) outputs and the new prefix (b, k - 1, *c): the last k - 1
      inputs (before `end`).
    """
    k = weight.shape[0]
    t = u.shape[1]
    full = jnp.concatenate([prefix.astype(u.dtype), u], axis=1)  # (b, k-1+t, *c)
    # Sum of k shifted views: cheap for the small kernels Mamba uses (k = 4).
    out = sum(full[:, i : i + t] * weight[i] for i in range(k))
    if bias is not None:
        out = out + bias
    if end is not None:
        return out, jax.lax.dynamic_slice_in_dim(full, end, k - 1, axis=1)
    return out, full[:, full.shape[1] - (k - 1) :]


def _names(part: str) -> tuple[str, ...]:
    """Logical names of one part's channel dimensions."""
    return {"z": ("mamba_inner",), "x": ("mamba_inner",), "B": ("mamba_groups", "mamba_state"),
            "C": ("mamba_groups", "mamba_state"), "dt": ("mamba_heads",)}[part]


class Mamba2Mixer(nnx.Module):
    """Parameters (d = hidden, e = inner = heads * head_dim, g groups, n state, k taps):
    z_proj, x_proj (d, e); B_proj, C_proj (d, g, n); dt_proj (d, heads), and
    `<part>_proj_bias` when `use_bias`; conv_x (k, e), conv_B, conv_C (k, g, n)
    and `conv_<part>_bias` when `use_conv_bias`; dt_bias, A_log, D (heads,);
    norm (e,); out_proj (e, d)."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.cfg = cfg
        d, h, inner = cfg.hidden_size, cfg.mamba_num_heads, cfg.mamba_intermediate
        proj = inner + cfg.conv_dim + h
        # Drawn fused and split, so a fresh model's values (and RNG stream) match the fused layout's.
        normal = lambda shape, std: (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
        w_in = split_in_proj(normal((d, proj), INIT_STD), cfg)
        w_conv = split_conv(normal((cfg.conv_kernel, cfg.conv_dim), 0.2), cfg)
        for part in PROJ_PARTS:
            setattr(self, f"{part}_proj", param(w_in[part], ("embed",) + _names(part)))
            bias = jnp.zeros(w_in[part].shape[1:], dtype)
            setattr(self, f"{part}_proj_bias", param(bias, _names(part)) if cfg.use_bias else None)
        for part in CONV_PARTS:
            setattr(self, f"conv_{part}", param(w_conv[part], ("conv_kernel",) + _names(part)))
            bias = jnp.zeros(w_conv[part].shape[1:], dtype)
            setattr(self, f"conv_{part}_bias", param(bias, _names(part)) if cfg.use_conv_bias else None)
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

    def _project_in(self, part: str, xm):
        """xm: (b, t, d) masked inputs -> part's projection (b, t, e) / (b, t, g, n) / (b, t, h)."""
        spec = "btd,dgn->btgn" if part in GROUPED else "btd,de->bte"
        y = dense(spec, xm, getattr(self, f"{part}_proj")[...])
        bias = getattr(self, f"{part}_proj_bias")
        return y if bias is None else y + bias[...]

    def _conv(self, part: str, u, prefix, keep, end=None):
        """Causal conv + SiLU of one part, zero at padding; returns (out, new prefix)."""
        bias = getattr(self, f"conv_{part}_bias")
        out, state = causal_conv(u, getattr(self, f"conv_{part}")[...], None if bias is None else bias[...],
                                 prefix, end)
        keep = keep.reshape(keep.shape + (1,) * (out.ndim - 2))
        return jnp.where(keep, jax.nn.silu(out), 0).astype(u.dtype), state

    def _dt(self, raw):
        """(b, t, h) dt projection -> float32 step sizes after softplus and clamp."""
        lo, hi = self.cfg.time_step_limit
        return jnp.clip(jax.nn.softplus(raw.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)), lo, hi)

    def project(self, x, layout: Layout, conv_prefix=None, end=None, halo=None):
        """The input projections, causal conv and the SSM parameters for x's tokens.

        Args:
          x: (b, t, d) normed hidden states; layout: token validity.
          conv_prefix: (b, k - 1, conv_dim) fused [x | B | C] inputs before x,
            or None (zeros).
          end: None, or a traced count of real positions in x: the positions
            after it are padding of the last sequence block, kept out of the
            state (dt = 0 there; the conv state is the inputs before `end`).
          halo: None, or (axis name, size): x is one shard of a sequence split
            along that mesh axis, and each part's conv prefix is the previous
            shard's last inputs (`hybridvlm.context.mamba.conv_halo`).
        Returns:
          dict(z (b, t, h * p), x (b, t, h, p), B, C (b, t, g, n),
               dt (b, t, h) float32 after softplus and clamp, A (h,) float32,
               conv_state (b, k - 1, conv_dim)).
        """
        cfg = self.cfg
        keep = layout.valid
        xm = jnp.where(keep[..., None], x, 0).astype(x.dtype)
        prefix = self.zero_state(x.shape[0], x.dtype).conv if conv_prefix is None else conv_prefix
        prefixes = split_conv(prefix, cfg)
        conv, states = {}, {}
        for part in CONV_PARTS:
            u = self._project_in(part, xm)
            prefix_part = prefixes[part] if halo is None else conv_halo(u, cfg.conv_kernel, *halo)
            conv[part], states[part] = self._conv(part, u, prefix_part, keep, end)
        dt = self._dt(self._project_in("dt", xm))
        if end is not None:
            dt = jnp.where((jnp.arange(x.shape[1]) < end)[:, None], dt, 0.0)
        return dict(
            z=self._project_in("z", xm),
            x=rearrange(conv["x"], "b t (h p) -> b t h p", h=cfg.mamba_num_heads),
            B=conv["B"],
            C=conv["C"],
            dt=dt,
            A=-jnp.exp(self.A_log[...].astype(jnp.float32)),
            conv_state=fuse_conv(states),
        )

    def project_scoring(self, x, layout: Layout, halo=None):
        """B, C (b, t, g, n) and dt (b, t, h) only, for token scoring.

        Equal to `project(...)`'s values (the conv is depthwise, so B and C
        need only their own channels) at a fraction of the cost: the z and x
        projections, most of the input projection's width, are skipped.
        halo: as `project` (x is one shard of a sequence split along a mesh axis).
        """
        cfg = self.cfg
        keep = layout.valid
        xm = jnp.where(keep[..., None], x, 0).astype(x.dtype)
        out = {}
        for part in GROUPED:
            u = self._project_in(part, xm)
            prefix = (jnp.zeros((x.shape[0], cfg.conv_kernel - 1, cfg.n_groups, cfg.ssm_state_size), x.dtype)
                      if halo is None else conv_halo(u, cfg.conv_kernel, *halo))
            out[part], _ = self._conv(part, u, prefix, keep)
        return dict(
            B=out["B"],
            C=out["C"],
            dt=self._dt(self._project_in("dt", xm)),
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
        if layout.sequence_axis is not None:
            return self._run_sharded(x, layout, state)
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
        return self._finish(x, xs, y, ssm, p_, state)

    def _run_sharded(self, x, layout: Layout, state: MambaState | None):
        """`__call__` on one shard of a prompt split along `layout.sequence_axis`
        (inside `jax.shard_map`; see `hybridvlm.context.mamba`). The prompt starts
        the sequence (a given `state` is a fresh zero state); the returned state is
        this shard's end of the sequence (the last shard's is the prompt's)."""
        cfg = self.cfg
        axis, size = layout.sequence_axis
        b, t = x.shape[:2]
        if block_plan(t, cfg.seq_block, cfg.chunk_size)[0] > 1:
            return self._run_sharded_blocks(x, layout, state)
        p_ = self.project(x, layout, halo=(axis, size))
        xs, B, C, dt, A = p_["x"], p_["B"], p_["C"], p_["dt"], p_["A"]
        y, local = ssd(xs, dt, A, B, C, chunk_size=cfg.chunk_size, impl=cfg.ssd_impl,
                       chunk_group=cfg.ssd_chunk_group, precision=cfg.ssd_precision)
        y, ssm = sharded_ssd_tail(y, local, C, dt, A, axis)
        return self._finish(x, xs, y, ssm, p_, state)

    def _run_sharded_blocks(self, x, layout: Layout, state: MambaState | None):
        """`_run_sharded` for a shard longer than `seq_block`, in blocks of it, so the
        temporaries are one block's (as on one device). Two passes over the blocks:
        the first finds only the shard's (total log-decay, final state) from a zero
        state, which the shards exchange for their true incoming states
        (`hybridvlm.context.mamba.incoming_state`); the second is the one-device
        blocked pass started from that state. The price is the first pass's input
        projections (about a third more of the mixer's FLOPs)."""
        cfg = self.cfg
        axis, size = layout.sequence_axis
        b, t = x.shape[:2]
        # The conv's halo needs only the previous shard's last k - 1 projected inputs.
        k = cfg.conv_kernel
        tail_valid = layout.valid[:, t - (k - 1):]
        tail = jnp.where(tail_valid[..., None], x[:, t - (k - 1):], 0).astype(x.dtype)
        halo = fuse_conv({part: conv_halo(self._project_in(part, tail), k, axis, size) for part in CONV_PARTS})
        zero = self.zero_state(b, x.dtype)
        start = MambaState(conv=halo.astype(zero.conv.dtype), ssm=zero.ssm)
        real = jnp.ones((b, t), bool)

        def local_pass(carry, marker, xb, lb, realb):
            mstate, total = carry
            p_ = self.project(xb, lb, mstate.conv, jnp.sum(realb[0], dtype=jnp.int32))
            _, ssm = ssd(p_["x"], p_["dt"], p_["A"], p_["B"], p_["C"], chunk_size=cfg.chunk_size,
                         initial_state=mstate.ssm, impl=cfg.ssd_impl, chunk_group=cfg.ssd_chunk_group,
                         precision=cfg.ssd_precision)
            total = total + jnp.sum(p_["dt"] * p_["A"], axis=1)
            return (MambaState(conv=p_["conv_state"].astype(mstate.conv.dtype), ssm=ssm), total), marker

        # map_blocks maps its first argument block for block: a (b, t, 1) bool stands in for outputs.
        total0 = jnp.zeros((b, cfg.mamba_num_heads), jnp.float32)
        _, (local, total) = map_blocks(local_pass, jnp.zeros((b, t, 1), bool), x, layout, real,
                                       block=cfg.seq_block, align=cfg.chunk_size, carry=(start, total0))
        s_in, _ = incoming_state(total, local.ssm, axis)

        def run(carry, xb, lb, realb):
            yb, carry = self._run(xb, lb, carry, end=jnp.sum(realb[0], dtype=jnp.int32))
            return carry, yb

        y, new_state = map_blocks(run, x, layout, real, block=cfg.seq_block, align=cfg.chunk_size,
                                  carry=MambaState(conv=start.conv, ssm=s_in))
        return y, (None if state is None else MambaState(conv=new_state.conv.astype(state.conv.dtype),
                                                        ssm=new_state.ssm))

    def _finish(self, x, xs, y, ssm, p_, state):
        """D skip, gated norm and output projection of SSD outputs y (b, t, h, p)."""
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
