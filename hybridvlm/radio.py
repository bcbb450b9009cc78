"""RADIO-style ViT vision tower (follows HF transformers' `RadioModel`).

input conditioner (mean/std) -> patches (channel-major within a patch) ->
linear projection (+ a separate projection for temporally packed video
tubelets) -> + absolute position embedding, bilinearly resized from the
(max_rows, max_cols) table to the input grid -> class + register tokens
prepended -> pre-norm ViT blocks (LayerNorm, MHA with biases, LayerScale,
GELU MLP or SwiGLU) -> summary tokens and spatial features.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybridvlm.config import ConfigError
from hybridvlm.layers.init import const_param, normal_param, param, zeros_param
from hybridvlm.ops.attention import attention_naive
from hybridvlm.remat import remat_call

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class RadioConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    max_img_size: int
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    use_swiglu_ffn: bool = False
    qkv_bias: bool = True
    num_channels: int = 3
    num_cls_tokens: int = 3
    num_registers: int = 7
    video_temporal_patch_size: int | None = None
    summary_idxs: tuple[int, ...] = (0, 1)
    norm_mean: tuple[float, ...] = CLIP_MEAN
    norm_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self):
        def need(cond, field, why):
            if not cond:
                raise ConfigError(f"RadioConfig.{field}: {why}")

        need(self.hidden_size % self.num_heads == 0, "num_heads",
             f"{self.num_heads} does not divide hidden_size={self.hidden_size}")
        need(self.max_img_size % self.patch_size == 0, "max_img_size",
             f"{self.max_img_size} is not a multiple of patch_size={self.patch_size}")
        need(self.hidden_act in ("gelu",), "hidden_act", f"{self.hidden_act!r} is not supported (only 'gelu')")
        need(self.video_temporal_patch_size is None or self.video_temporal_patch_size >= 2,
             "video_temporal_patch_size", "must be None or >= 2")

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_cls_tokens + self.num_registers

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:  # two thirds, rounded up to a multiple of 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def table_side(self) -> int:
        return self.max_img_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RadioConfig":
        d = dict(d)
        for k in ("summary_idxs", "norm_mean", "norm_std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str) -> "RadioConfig":
        def get(field):
            if hf.get(field) is None:
                raise ConfigError(f"{source}: vision_config is missing field {field!r}")
            return hf[field]

        return cls(
            hidden_size=int(get("hidden_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=int(get("num_attention_heads")),
            patch_size=int(get("patch_size")),
            max_img_size=int(hf.get("max_img_size", 2048)),
            mlp_ratio=float(hf.get("mlp_ratio", 4.0)),
            hidden_act=str(hf.get("hidden_act", "gelu")),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
            use_swiglu_ffn=bool(hf.get("use_swiglu_ffn", False)),
            qkv_bias=bool(hf.get("qkv_bias", True)),
            num_channels=int(hf.get("num_channels", 3)),
            num_cls_tokens=int(hf.get("num_cls_tokens", 3)),
            num_registers=int(hf.get("num_registers", 7)),
            video_temporal_patch_size=hf.get("video_temporal_patch_size"),
            summary_idxs=tuple(hf.get("summary_idxs") or (0, 1)),
            norm_mean=tuple(hf.get("norm_mean") or CLIP_MEAN),
            norm_std=tuple(hf.get("norm_std") or CLIP_STD),
        )


def resize_bilinear(table, side: int):
    """(n, n, d) -> (side, side, d): torch `F.interpolate(mode="bilinear", align_corners=False)`.

    Half-pixel centres, edges clamped. `antialias=False` because torch's
    bilinear does not antialias; JAX's default would widen the kernel when
    shrinking the table (a different result for grids smaller than it).
    """
    return jax.image.resize(table, (side, side, table.shape[-1]), method="linear", antialias=False)


def patchify(pixels, patch: int):
    """(b, c, H, W) -> (b, rows * cols, c * patch * patch), channel-major in a patch."""
    return rearrange(pixels, "b c (r p) (k q) -> b (r k) (c p q)", p=patch, q=patch)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), dtype), ("vit_embed",))
        self.bias = param(jnp.zeros((dim,), dtype), ("vit_embed",))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class _Linear(nnx.Module):
    """y = x W + b with W (in, out): einsum-ready layout."""

    def __init__(self, din: int, dout: int, *, bias: bool, axes, rngs: nnx.Rngs, dtype):
        self.w = normal_param(rngs, (din, dout), axes, dtype)
        self.b = zeros_param((dout,), axes[1:], dtype) if bias else None

    def __call__(self, x):
        y = jnp.einsum("...i,io->...o", x, self.w[...])
        return y if self.b is None else y + self.b[...]


class RadioBlock(nnx.Module):
    """Pre-norm ViT block with LayerScale."""

    def __init__(self, cfg: RadioConfig, *, rngs: nnx.Rngs, dtype):
        d, f = cfg.hidden_size, cfg.mlp_hidden
        self.cfg = cfg
        self.norm1 = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
        self.q = _Linear(d, d, bias=cfg.qkv_bias, axes=("vit_embed", "vit_heads"), rngs=rngs, dtype=dtype)
        self.k = _Linear(d, d, bias=cfg.qkv_bias, axes=("vit_embed", "vit_heads"), rngs=rngs, dtype=dtype)
        self.v = _Linear(d, d, bias=cfg.qkv_bias, axes=("vit_embed", "vit_heads"), rngs=rngs, dtype=dtype)
        self.o = _Linear(d, d, bias=True, axes=("vit_heads", "vit_embed"), rngs=rngs, dtype=dtype)
        self.scale1 = const_param(jnp.ones((d,)), ("vit_embed",), dtype)
        self.norm2 = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
        if cfg.use_swiglu_ffn:
            self.gate = _Linear(d, f, bias=True, axes=("vit_embed", "vit_mlp"), rngs=rngs, dtype=dtype)
        else:
            self.gate = None
        self.fc1 = _Linear(d, f, bias=True, axes=("vit_embed", "vit_mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = _Linear(f, d, bias=True, axes=("vit_mlp", "vit_embed"), rngs=rngs, dtype=dtype)
        self.scale2 = const_param(jnp.ones((d,)), ("vit_embed",), dtype)

    def __call__(self, h):
        """h: (b, t, d) -> (b, t, d); bidirectional attention over all tokens."""
        b, t, d = h.shape
        heads = self.cfg.num_heads
        x = self.norm1(h)
        split = lambda y: rearrange(y, "b t (n k) -> b t n k", n=heads)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        pos = jnp.zeros((b, t), jnp.int32)  # equal positions + all valid: no mask
        att = attention_naive(q, k, v, q_pos=pos, k_pos=pos, k_valid=jnp.ones((b, t), bool),
                              scale=(d // heads) ** -0.5)
        h = h + self.o(rearrange(att, "b t n k -> b t (n k)")) * self.scale1[...]
        x = self.norm2(h)
        if self.gate is None:
            y = self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
        else:
            y = self.fc2(jax.nn.silu(self.gate(x)) * self.fc1(x))
        return h + y * self.scale2[...]


class RadioVisionModel(nnx.Module):
    """RADIO ViT. `apply_conditioner=False` when preprocessing already normalised
    the pixels (the VLM does this, as the reference detaches the conditioner)."""

    def __init__(self, cfg: RadioConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, apply_conditioner: bool = True):
        d = cfg.hidden_size
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.apply_conditioner = apply_conditioner
        self.patch_projection = normal_param(rngs, (cfg.patch_dim, d), ("vit_patch", "vit_embed"), dtype)
        tp = cfg.video_temporal_patch_size
        self.video_patch_projection = (
            normal_param(rngs, (tp * cfg.patch_dim, d), ("vit_patch", "vit_embed"), dtype) if tp else None
        )
        side = cfg.table_side
        self.position_embedding = normal_param(rngs, (side, side, d), (None, None, "vit_embed"), dtype)
        self.cls_register_token = normal_param(rngs, (cfg.num_prefix_tokens, d), (None, "vit_embed"), dtype)
        self.blocks = nnx.List([RadioBlock(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_layers)])

    def position_embeddings(self, rows: int, cols: int):
        """(rows * cols, d): the table resized to a square of max(rows, cols), then cropped."""
        side = max(rows, cols)
        table = self.position_embedding[...].astype(jnp.float32)  # (table_side, table_side, d)
        pos = resize_bilinear(table, side)[:rows, :cols]
        return rearrange(pos, "y x d -> (y x) d").astype(self.dtype)

    def __call__(self, pixels, *, remat=None):
        """Encodes images or video tubelets.

        Args:
          pixels: (b, c, H, W) with c = num_channels (images) or
            c = video_temporal_patch_size * num_channels (tubelets, frames
            stacked along channels); H, W multiples of patch_size.
          remat: None or a `jax.checkpoint` policy (`hybridvlm.remat.remat_policy`),
            applied to each block.
        Returns:
          dict(summary=(b, len(summary_idxs) * d), features=(b, rows * cols, d),
               last_hidden_state=(b, prefix + rows * cols, d)).
        """
        cfg = self.cfg
        b, c, H, W = pixels.shape
        ps = cfg.patch_size
        if H % ps or W % ps:
            raise ValueError(f"pixels: height and width ({H}, {W}) must be multiples of patch_size={ps}")
        if c == cfg.num_channels:
            proj = self.patch_projection[...]
        elif self.video_patch_projection is not None and c == cfg.video_temporal_patch_size * cfg.num_channels:
            proj = self.video_patch_projection[...]
        else:
            raise ValueError(
                f"pixels: {c} channels; expected {cfg.num_channels} (images)"
                + (f" or {cfg.video_temporal_patch_size * cfg.num_channels} (video tubelets)"
                   if cfg.video_temporal_patch_size else " (this tower has no video patch projection)")
            )
        x = pixels.astype(jnp.float32)
        if self.apply_conditioner:
            reps = c // cfg.num_channels
            mean = jnp.tile(jnp.asarray(cfg.norm_mean, jnp.float32), reps)[:, None, None]
            std = jnp.tile(jnp.asarray(cfg.norm_std, jnp.float32), reps)[:, None, None]
            x = (x - mean) / std
        x = x.astype(self.dtype)
        rows, cols = H // ps, W // ps
        h = jnp.einsum("btp,pd->btd", patchify(x, ps), proj) + self.position_embeddings(rows, cols)
        prefix = jnp.broadcast_to(self.cls_register_token[...], (b,) + self.cls_register_token.shape)
        h = jnp.concatenate([prefix.astype(h.dtype), h], axis=1)
        for block in self.blocks:
            h = block(h) if remat is None else remat_call(block, remat, h)
        summary = rearrange(h[:, jnp.asarray(cfg.summary_idxs)], "b s d -> b (s d)")
        return dict(summary=summary, features=h[:, cfg.num_prefix_tokens:], last_hidden_state=h)
