"""The hybrid video VLM: RADIO tower -> pixel shuffle -> projector -> Nemotron-H LM.

Follows HF transformers' `NemotronH_Omni_Reasoning_V3` (vision + text; the
audio branch is not supported). Visual embeddings replace the placeholder
tokens (`image_token_id`; videos reuse it) in order, with static shapes, so
interleaved prompts ("Frame i sampled at t seconds: <img>...</img>" between
tubelets) work.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from hybridvlm.cache import Layout
from hybridvlm.config import ConfigError, LMConfig
from hybridvlm.context.prefill import SequenceParallel, context_parallel_hidden
from hybridvlm.generate import generate
from hybridvlm.layers.init import normal_param
from hybridvlm.layers.norm import RMSNorm
from hybridvlm.lm import NemotronHForCausalLM
from hybridvlm.radio import LayerNorm, RadioConfig, RadioVisionModel
from hybridvlm.remat import remat_policy
from reduction.evs import evs_keep_count, evs_retention_mask
from reduction.prune import compaction_order


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """Static description of the VLM; `text` and `vision` are the towers' configs."""

    text: LMConfig
    vision: RadioConfig
    image_token_id: int
    downsample_ratio: float = 0.5
    projector_hidden_size: int = 4096
    vision_final_layernorm: bool = False  # present when the LM has MTP layers
    image_size: int | None = None  # frame side in pixels (force_image_size)
    video_pruning_rate: float = 0.0  # EVS before the LM; 0 disables it
    image_start_token: str = "<img>"
    image_end_token: str = "</img>"

    def __post_init__(self):
        merge = round(1 / self.downsample_ratio)
        if abs(merge * self.downsample_ratio - 1) > 1e-6:
            raise ConfigError(f"VLMConfig.downsample_ratio: {self.downsample_ratio} is not 1/integer")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(f"VLMConfig.image_token_id: {self.image_token_id} is outside the vocabulary")
        if self.vision.video_temporal_patch_size is None:
            raise ConfigError("VLMConfig.vision: video_temporal_patch_size must be set for video input")
        if not 0.0 <= self.video_pruning_rate < 1.0:
            raise ConfigError(f"VLMConfig.video_pruning_rate: {self.video_pruning_rate} is outside [0, 1)")

    @property
    def merge(self) -> int:
        """Pixel-shuffle factor per spatial side (2 for ratio 0.5)."""
        return round(1 / self.downsample_ratio)

    @property
    def temporal_patch_size(self) -> int:
        return self.vision.video_temporal_patch_size

    def tokens_per_tubelet(self, height: int, width: int) -> int:
        ps = self.vision.patch_size
        return (height // ps) * (width // ps) // self.merge**2

    def replace(self, **overrides: Any) -> "VLMConfig":
        """Overrides: VLM fields by name; any other name goes to the text config."""
        own = {f.name for f in dataclasses.fields(self)} - {"text", "vision"}
        mine = {k: v for k, v in overrides.items() if k in own}
        rest = {k: v for k, v in overrides.items() if k not in own}
        return dataclasses.replace(self, text=self.text.replace(**rest) if rest else self.text, **mine)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["text"], d["vision"] = self.text.to_dict(), self.vision.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VLMConfig":
        d = dict(d)
        d["text"], d["vision"] = LMConfig.from_dict(d["text"]), RadioConfig.from_dict(d["vision"])
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str) -> "VLMConfig":
        """From an HF `nemotron_h_omni` config.json (legacy field names accepted)."""
        text = hf.get("text_config") or hf.get("llm_config")
        vision = hf.get("vision_config")
        if not text:
            raise ConfigError(f"{source}: missing field 'text_config'")
        if not vision:
            raise ConfigError(f"{source}: missing field 'vision_config'")
        token = hf.get("image_token_id", hf.get("img_context_token_id"))
        if token is None:
            raise ConfigError(f"{source}: missing field 'image_token_id'")
        vision_cfg = RadioConfig.from_hf(vision, source)
        tp = hf.get("video_temporal_patch_size", vision_cfg.video_temporal_patch_size)
        if vision_cfg.video_temporal_patch_size is None and tp:
            vision_cfg = dataclasses.replace(vision_cfg, video_temporal_patch_size=int(tp))
        width = hf.get("vision_hidden_size", hf.get("vit_hidden_size", vision_cfg.hidden_size))
        if width != vision_cfg.hidden_size:
            raise ConfigError(f"{source}: vision_hidden_size={width} != vision_config.hidden_size={vision_cfg.hidden_size}")
        return cls(
            text=LMConfig.from_hf(text, source=f"{source} (text_config)"),
            vision=vision_cfg,
            image_token_id=int(token),
            downsample_ratio=float(hf.get("downsample_ratio", 0.5)),
            projector_hidden_size=int(hf.get("projector_hidden_size", 4096)),
            vision_final_layernorm=int(text.get("num_nextn_predict_layers") or 0) > 0,
            image_size=hf.get("force_image_size"),
            video_pruning_rate=float(hf.get("video_pruning_rate") or 0.0),
        )


def pixel_shuffle(features, merge: int):
    """(n, rows, cols, c) -> (n, rows / m, cols / m, m * m * c).

    Output channel order is (row offset, col offset, channel): token (a, b)
    holds features [m a + i, m b + j] for i, j < m, as in the reference.
    """
    return rearrange(features, "n (a i) (b j) c -> n a b (i j c)", i=merge, j=merge)


class Projector(nnx.Module):
    """RMSNorm -> Linear -> squared ReLU -> Linear (no biases)."""

    def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs, dtype, eps: float = 1e-5):
        self.norm = RMSNorm(din, eps=eps, dtype=dtype)
        self.linear_1 = normal_param(rngs, (din, hidden), ("vit_merged", "proj_hidden"), dtype)
        self.linear_2 = normal_param(rngs, (hidden, dout), ("proj_hidden", "embed"), dtype)

    def __call__(self, x):
        """x: (..., din) -> (..., dout)."""
        h = jnp.einsum("...i,ih->...h", self.norm(x), self.linear_1[...])
        return jnp.einsum("...h,ho->...o", jnp.square(jax.nn.relu(h)), self.linear_2[...])


class NemotronHVLModel(nnx.Module):
    """Video VLM with the same calling conventions as the LM, plus pixels."""

    def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        v = cfg.vision
        self.vision = RadioVisionModel(v, rngs=rngs, dtype=dtype, apply_conditioner=False)
        self.vision_norm = LayerNorm(v.hidden_size, eps=v.layer_norm_eps, dtype=dtype) if cfg.vision_final_layernorm else None
        self.projector = Projector(v.hidden_size * cfg.merge**2, cfg.projector_hidden_size, cfg.text.hidden_size,
                                   rngs=rngs, dtype=dtype)
        self.language_model = NemotronHForCausalLM(cfg.text, rngs=rngs, dtype=dtype)

    @property
    def text_config(self) -> LMConfig:
        return self.config.text

    # ------------------------------------------------------------- vision
    def video_features(self, pixel_values_videos, *, remat=None):
        """Vision tower features before pixel shuffle.

        pixel_values_videos: (videos, tubelets, temporal_patch * 3, H, W),
        already normalised. Returns (videos * tubelets, rows * cols, d_vit).
        remat: None or a `hybridvlm.remat.REMAT_POLICIES` name: each tower
        block runs under its own `jax.checkpoint` (same values; the backward
        pass recomputes one block's intermediates at a time).
        """
        x = rearrange(pixel_values_videos, "v t c h w -> (v t) c h w")
        return self.vision(x, remat=remat_policy(remat))["features"]

    def video_embeddings(self, pixel_values_videos, *, remat=None):
        """(videos, tubelets, 2*3, H, W) -> (videos * tubelets * tokens, d_lm); remat as `video_features`."""
        return self._project(self.video_features(pixel_values_videos, remat=remat), *pixel_values_videos.shape[-2:])

    def image_embeddings(self, pixel_values):
        """(images, 3, H, W), normalised -> (images * tokens, d_lm), via the
        tower's single-frame patch projection."""
        return self._project(self.vision(pixel_values)["features"], *pixel_values.shape[-2:])

    def _project(self, feats, H: int, W: int):
        """Tower features (n, rows * cols, d_vit) -> LM tokens (n * tokens, d_lm)."""
        ps = self.config.vision.patch_size
        if self.vision_norm is not None:
            feats = self.vision_norm(feats)
        grid = rearrange(feats, "n (r c) d -> n r c d", r=H // ps, c=W // ps)
        merged = pixel_shuffle(grid, self.config.merge)
        tokens = self.projector(rearrange(merged, "n a b d -> (n a b) d"))
        return tokens.astype(self.dtype)

    def visual_slots(self, batch: int, pixel_values_videos=None, pixel_values=None) -> int:
        """Visual slots per row entering the LM (after EVS), from the pixel shapes alone.

        Every row holds the same number of videos (or images) of one frame
        bucket; the tubelets of a shorter video are padding, their
        placeholders masked (attention_mask 0).
        """
        if pixel_values_videos is not None:
            v, tubelets, _, H, W = pixel_values_videos.shape
            per_tubelet = self.config.tokens_per_tubelet(H, W)
            if v % batch:
                raise ValueError(f"pixel_values_videos holds {v} videos for {batch} rows: every row needs the "
                                 "same number of videos (pad shorter videos to the frame bucket)")
            rate = self.config.video_pruning_rate
            kept = evs_keep_count(tubelets, per_tubelet, rate) if rate > 0 else tubelets * per_tubelet
            return v // batch * kept
        if pixel_values is not None:
            n, _, H, W = pixel_values.shape
            if n % batch:
                raise ValueError(f"pixel_values holds {n} images for {batch} rows: every row needs the same number")
            return n // batch * self.config.tokens_per_tubelet(H, W)
        return 0

    def check_inputs(self, input_ids, attention_mask=None, *, reduction=None, pixel_values_videos=None,
                     pixel_values=None):
        """Refuses bad inputs before anything is traced or run.

        Shapes are always checked, and a plan against the visual slots the
        pixel shapes give each row (`ReductionPlan.check_fits`); placeholder
        counts only when input_ids is concrete (not under tracing).
        """
        if pixel_values_videos is not None and pixel_values is not None:
            raise ValueError("pass either pixel_values_videos or pixel_values, not both: both fill the same "
                             f"placeholder id {self.config.image_token_id}")
        n_visual, source = 0, "no pixels"
        if pixel_values_videos is not None:
            if pixel_values_videos.ndim != 5:
                raise ValueError(f"pixel_values_videos must be (videos, tubelets, {self.config.temporal_patch_size}"
                                 f" * 3, H, W), got shape {pixel_values_videos.shape}")
            v, t, _, H, W = pixel_values_videos.shape
            n_visual, source = v * t * self.config.tokens_per_tubelet(H, W), "pixel_values_videos"
        if pixel_values is not None:
            if pixel_values.ndim != 4:
                raise ValueError(f"pixel_values must be (images, 3, H, W), got shape {pixel_values.shape}")
            n, _, H, W = pixel_values.shape
            n_visual, source = n * self.config.tokens_per_tubelet(H, W), "pixel_values"
        self.language_model.check_inputs(input_ids, attention_mask)
        b, t = input_ids.shape
        concrete = not isinstance(input_ids, jax.core.Tracer)
        if concrete:
            n_placeholders = int(np.sum(np.asarray(input_ids) == self.config.image_token_id))
            if n_placeholders != n_visual:
                raise ValueError(
                    f"input_ids has {n_placeholders} visual placeholder tokens (id {self.config.image_token_id}) "
                    f"but {source} gives {n_visual} visual tokens"
                )
        if reduction is None:
            return
        slots = self.visual_slots(b, pixel_values_videos, pixel_values)
        if slots == 0:
            raise ValueError("reduction= needs visual input (pixel_values_videos or pixel_values)")
        seq_len = t - (n_visual // b - slots)  # EVS shortens every row by the same count
        reduction.check_fits(num_layers=self.text_config.num_layers, seq_len=seq_len, visual_slots=slots)
        if concrete:  # each row must hold its share of the placeholders
            per_row = (np.asarray(input_ids) == self.config.image_token_id).sum(axis=1)
            bad = np.flatnonzero(per_row != n_visual // b)
            if bad.size:
                raise ValueError(f"with reduction=, every row needs {n_visual // b} visual placeholders (real or "
                                 f"masked); row {int(bad[0])} has {int(per_row[bad[0]])}")

    def embed(self, input_ids, pixel_values_videos=None, pixel_values=None, attention_mask=None):
        """Text embeddings with the visual tokens scattered onto the placeholders.

        input_ids: (b, t); placeholders are filled row by row: a row's real
        placeholders (attention_mask 1) in order by its first tubelets' (or
        images') tokens, then its masked ones (a video shorter than the
        frame bucket) by the padding tubelets.
        Returns (b, t, d_lm).
        """
        self.check_inputs(input_ids, attention_mask, pixel_values_videos=pixel_values_videos,
                          pixel_values=pixel_values)
        return self._embed(input_ids, pixel_values_videos, pixel_values, attention_mask)

    def _embed(self, input_ids, pixel_values_videos, pixel_values, attention_mask, remat=None):
        """`embed` without the checks (its callers have made them)."""
        h = self.language_model.embed_tokens(input_ids)
        if pixel_values_videos is not None:
            visual = self.video_embeddings(pixel_values_videos, remat=remat)  # (n, d)
        elif pixel_values is not None:
            visual = self.image_embeddings(pixel_values)
        else:
            return h
        slots = self._slots(input_ids, attention_mask)
        return jnp.where(self._is_visual(input_ids)[..., None], jnp.take(visual, slots, axis=0), h)

    def _is_visual(self, input_ids):
        return input_ids == self.config.image_token_id

    def _slots(self, input_ids, attention_mask=None):
        """(b, t) index of each placeholder's visual token (0 elsewhere).

        Rows in order; within a row its real placeholders first, then its
        masked ones, each in sequence order. With no masked placeholder this
        is their row-major order.
        """
        vis = self._is_visual(input_ids)
        real = vis if attention_mask is None else vis & attention_mask.astype(bool)
        masked = vis & ~real
        per_row = jnp.sum(vis, axis=1, dtype=jnp.int32)
        offset = jnp.cumsum(per_row) - per_row  # exclusive: placeholders of the rows before
        n_real = jnp.sum(real, axis=1, dtype=jnp.int32)
        rank = jnp.where(real, jnp.cumsum(real, axis=1) - 1, n_real[:, None] + jnp.cumsum(masked, axis=1) - 1)
        return jnp.where(vis, offset[:, None] + rank, 0).astype(jnp.int32)

    def prepare(self, input_ids, attention_mask=None, pixel_values_videos=None, pixel_values=None, *,
                columns: bool = False):
        """Embeds the prompt and applies EVS (if `video_pruning_rate` > 0).

        EVS drops, per video, the tokens least changed since the previous
        tubelet (the reference's `compute_retention_mask`), before the LM;
        the kept tokens keep their order. Every row holds the same number of
        videos of one frame bucket, so the new length is static; a video
        shorter than the bucket loses its padding tubelets first and keeps
        as many real tokens as it would alone.
        Returns:
          input_ids, attention_mask (b, t') and embeddings (b, t', d); with
          `columns`, also (b, t') int32: each kept token's column in input_ids.
        """
        out = self._prepare(input_ids, attention_mask, pixel_values_videos, pixel_values)
        return out if columns else out[:3]

    def _prepare(self, input_ids, attention_mask=None, pixel_values_videos=None, pixel_values=None, remat=None):
        """`prepare`, plus (b, t') int32: each kept token's column in input_ids
        (ascending; `arange(t)` without EVS). remat: as `video_features`."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        h = self._embed(input_ids, pixel_values_videos, pixel_values, attention_mask, remat)
        rate = self.config.video_pruning_rate
        if pixel_values_videos is None or rate == 0.0:
            columns = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
            return input_ids, attention_mask, h, columns
        v, tubelets, _, H, W = pixel_values_videos.shape
        b = input_ids.shape[0]
        per_tubelet = self.config.tokens_per_tubelet(H, W)
        embeds = self.video_embeddings(pixel_values_videos, remat=remat).reshape(v, tubelets, per_tubelet, -1)
        is_visual, slots = self._is_visual(input_ids), self._slots(input_ids, attention_mask)
        # Which tubelets are real: a slot filled by a real (unmasked) placeholder.
        n_slots = v * tubelets * per_tubelet  # out of range: dropped (a negative index would wrap)
        real_slot = jnp.zeros((n_slots,), bool).at[
            jnp.where(is_visual & attention_mask.astype(bool), slots, n_slots).reshape(-1)].set(True, mode="drop")
        real_tubelets = real_slot.reshape(v, tubelets, per_tubelet).any(axis=-1).sum(axis=1)  # (v,)
        retained = jax.vmap(lambda e, n: evs_retention_mask(e, rate, num_real=n))(embeds, real_tubelets)
        keep = ~is_visual | jnp.take(retained.reshape(-1), slots)
        drop = (v // b) * (tubelets * per_tubelet - evs_keep_count(tubelets, per_tubelet, rate))
        order = compaction_order(keep, input_ids.shape[1] - drop)
        take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
        return take(input_ids), take(attention_mask), take(h), order

    # -------------------------------------------------------------- modes
    def __call__(self, input_ids, *, pixel_values_videos=None, pixel_values=None, attention_mask=None,
                 reduction=None):
        """logits (b, t', vocab) float32 for a prompt with an optional video
        (videos, tubelets, 2*3, H, W) or images (images, 3, H, W).

        attention_mask: (b, t), 0 on padding and on the masked placeholders of
        a video shorter than the batch's frame bucket (see `hybridvlm.batch`).
        reduction: optional static ReductionPlan; the visual slots are the
        placeholder positions (after EVS, when `video_pruning_rate` > 0, so
        `reduction.num_visual` counts the tokens EVS keeps), and t' = t minus
        the tokens EVS and the plan prune.
        """
        self.check_inputs(input_ids, attention_mask, reduction=reduction, pixel_values_videos=pixel_values_videos,
                          pixel_values=pixel_values)
        ids, mask, h = self.prepare(input_ids, attention_mask, pixel_values_videos, pixel_values)
        return self.language_model(ids, attention_mask=mask, inputs_embeds=h, reduction=reduction,
                                   visual_mask=self.visual_mask(ids, reduction))

    def hidden_states(self, input_ids, *, pixel_values_videos=None, pixel_values=None, attention_mask=None,
                      reduction=None, remat=None, sequence: SequenceParallel | None = None):
        """Final hidden states (before the final norm) and where each one sits.

        The training loss reads a few positions' logits from these
        (`self.language_model.logits(h_k)` on (b, k, d)) instead of the full
        (b, t', vocab) tensor; `self.language_model.logits(h)` of all of them
        equals `__call__`.

        Args: as `__call__`, plus
          remat: None or a `hybridvlm.remat.REMAT_POLICIES` name: each LM layer
            (and the vision tower) is rematerialised in the backward pass.
          sequence: None, or a `SequenceParallel`: the LM's layers run split along its
            mesh axis (`hybridvlm.context`; the tower and projector before the split, as
            ever; the prompt's length and the plan's dropped counts must divide by the
            axis size, see `hybridvlm.context.shard_plan`). Same results.
        Returns:
          h (b, t', d) in the model's dtype, and columns (b, t') int32: the
          column in `input_ids` of each surviving token (ascending per row;
          EVS and the plan drop visual tokens only, so every text column of a
          row in its bucket's layout survives).
        """
        self.check_inputs(input_ids, attention_mask, reduction=reduction, pixel_values_videos=pixel_values_videos,
                          pixel_values=pixel_values)
        ids, mask, h, columns = self._prepare(input_ids, attention_mask, pixel_values_videos, pixel_values, remat)
        lm = self.language_model
        visual = self.visual_mask(ids, reduction)
        if sequence is not None:
            h, index = context_parallel_hidden(lm, h, mask, mesh=sequence.mesh, axis=sequence.axis, remat=remat,
                                               reduction=reduction, visual_mask=visual)
            return h, jnp.take_along_axis(columns, index, axis=1)
        lm.check_inputs(ids, mask, reduction=reduction, visual_mask=visual, inputs_embeds=h)
        h, _, layout = lm.run_layers_with_layout(h, Layout.prompt(mask), reduction=reduction, visual=visual,
                                                 remat=remat)
        return h, jnp.take_along_axis(columns, layout.index, axis=1)

    def visual_mask(self, input_ids, reduction):
        """(b, t) placeholder positions (the visual slots) when a plan needs them, else None."""
        return None if reduction is None else self._is_visual(input_ids)

    def prefill(self, input_ids, attention_mask, cache_size: int, *, pixel_values_videos=None, pixel_values=None,
                reduction=None):
        self.check_inputs(input_ids, attention_mask, reduction=reduction, pixel_values_videos=pixel_values_videos,
                          pixel_values=pixel_values)
        ids, mask, h = self.prepare(input_ids, attention_mask, pixel_values_videos, pixel_values)
        return self.language_model.prefill(ids, mask, cache_size, inputs_embeds=h,
                                           reduction=reduction, visual_mask=self.visual_mask(ids, reduction))

    def decode(self, tokens, cache):
        return self.language_model.decode(tokens, cache)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Autoregressive answer; kwargs as `hybridvlm.generate.generate`,
        plus `pixel_values_videos` or `pixel_values`, and `reduction`."""
        return generate(self, input_ids, attention_mask, **kwargs)
