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

from hybridvlm.config import ConfigError, LMConfig
from hybridvlm.layers.init import normal_param
from hybridvlm.layers.norm import RMSNorm
from hybridvlm.lm import NemotronHForCausalLM
from hybridvlm.radio import LayerNorm, RadioConfig, RadioVisionModel


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
    def video_features(self, pixel_values_videos):
        """Vision tower features before pixel shuffle.

        pixel_values_videos: (videos, tubelets, temporal_patch * 3, H, W),
        already normalised. Returns (videos * tubelets, rows * cols, d_vit).
        """
        x = rearrange(pixel_values_videos, "v t c h w -> (v t) c h w")
        return self.vision(x)["features"]

    def video_embeddings(self, pixel_values_videos):
        """(videos, tubelets, 2*3, H, W) -> (videos * tubelets * tokens, d_lm)."""
        return self._project(self.video_features(pixel_values_videos), *pixel_values_videos.shape[-2:])

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

    def check_inputs(self, input_ids, pixel_values_videos=None, pixel_values=None):
        """Eager check of the visual inputs against the placeholders.

        Shapes are always checked; the placeholder count only when input_ids
        is concrete (not under tracing).
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
        if isinstance(input_ids, jax.core.Tracer):
            return
        n_placeholders = int(np.sum(np.asarray(input_ids) == self.config.image_token_id))
        if n_placeholders != n_visual:
            raise ValueError(
                f"input_ids has {n_placeholders} visual placeholder tokens (id {self.config.image_token_id}) "
                f"but {source} gives {n_visual} visual tokens"
            )

    def embed(self, input_ids, pixel_values_videos=None, pixel_values=None):
        """Text embeddings with the visual tokens scattered onto the placeholders.

        input_ids: (b, t); placeholders are filled in row-major order by the
        video tubelets' (or the images') tokens.
        Returns (b, t, d_lm).
        """
        self.check_inputs(input_ids, pixel_values_videos, pixel_values)
        h = self.language_model.embed_tokens(input_ids)
        if pixel_values_videos is not None:
            visual = self.video_embeddings(pixel_values_videos)  # (n, d)
        elif pixel_values is not None:
            visual = self.image_embeddings(pixel_values)
        else:
            return h
        return jnp.where(self._is_visual(input_ids)[..., None], jnp.take(visual, self._slots(input_ids), axis=0), h)

    def _is_visual(self, input_ids):
        return input_ids == self.config.image_token_id

    def _slots(self, input_ids):
        """(b, t) index of each placeholder among all placeholders, row-major (0 elsewhere)."""
        is_visual = self._is_visual(input_ids)
        slot = jnp.cumsum(is_visual.reshape(-1)).reshape(is_visual.shape) - 1
        return jnp.clip(slot, 0, None)

    def prepare(self, input_ids, attention_mask=None, pixel_values_videos=None, pixel_values=None):
        """Embeds the prompt and applies EVS (if `video_pruning_rate` > 0).

        EVS drops, per video, the tokens least changed since the previous
        tubelet (the reference's `compute_retention_mask`), before the LM;
        the kept tokens keep their order. Every row must hold the same number
        of videos, so the new length is static.
        Returns:
          input_ids, attention_mask (b, t') and embeddings (b, t', d).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        h = self.embed(input_ids, pixel_values_videos, pixel_values)
        rate = self.config.video_pruning_rate
        if pixel_values_videos is None or rate == 0.0:
            return input_ids, attention_mask, h
        from reduction.evs import evs_keep_count, evs_retention_mask
        from reduction.prune import compaction_order

        v, tubelets, _, H, W = pixel_values_videos.shape
        b = input_ids.shape[0]
        if v % b:
            raise ValueError(f"EVS needs the same number of videos in every row: {v} videos for {b} rows")
        per_video = tubelets * self.config.tokens_per_tubelet(H, W)
        embeds = self.video_embeddings(pixel_values_videos).reshape(v, tubelets, per_video // tubelets, -1)
        retained = jax.vmap(lambda e: evs_retention_mask(e, rate))(embeds).reshape(-1)  # (v * per_video,)
        keep = ~self._is_visual(input_ids) | jnp.take(retained, self._slots(input_ids))
        drop = (v // b) * (per_video - evs_keep_count(tubelets, per_video // tubelets, rate))
        order = compaction_order(keep, input_ids.shape[1] - drop)
        take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
        return take(input_ids), take(attention_mask), take(h)

    # -------------------------------------------------------------- modes
    def __call__(self, input_ids, *, pixel_values_videos=None, pixel_values=None, attention_mask=None,
                 reduction=None):
        """logits (b, t', vocab) float32 for a prompt with an optional video
        (videos, tubelets, 2*3, H, W) or images (images, 3, H, W).

        reduction: optional static ReductionPlan; the visual tokens are the
        placeholder positions (after EVS, when `video_pruning_rate` > 0, so
        `reduction.num_visual` counts the tokens EVS keeps), and t' = t minus
        the tokens EVS and the plan prune.
        """
        ids, mask, h = self.prepare(input_ids, attention_mask, pixel_values_videos, pixel_values)
        return self.language_model(ids, attention_mask=mask, inputs_embeds=h, reduction=reduction,
                                   visual_mask=self.visual_mask(ids, reduction))

    def check_reduction(self, input_ids, reduction, pixel_values_videos=None, pixel_values=None):
        """Eager check that a plan fits this prompt: its layers, and its
        visual-token count per row (after EVS when enabled)."""
        from hybridvlm.lm import check_reduction

        counts = (np.asarray(input_ids) == self.config.image_token_id).sum(axis=1)
        if pixel_values_videos is not None and self.config.video_pruning_rate > 0:
            from reduction.evs import evs_keep_count

            v, tubelets, _, H, W = pixel_values_videos.shape
            per_tubelet = self.config.tokens_per_tubelet(H, W)
            kept = (v // len(counts)) * evs_keep_count(tubelets, per_tubelet, self.config.video_pruning_rate)
            counts = np.full_like(counts, kept)
        check_reduction(reduction, self.text_config.num_layers, counts)

    def visual_mask(self, input_ids, reduction):
        """(b, t) placeholder positions when a plan needs them, else None."""
        return None if reduction is None else input_ids == self.config.image_token_id

    def prefill(self, input_ids, attention_mask, cache_size: int, *, pixel_values_videos=None, pixel_values=None,
                reduction=None):
        ids, mask, h = self.prepare(input_ids, attention_mask, pixel_values_videos, pixel_values)
        return self.language_model.prefill(ids, mask, cache_size, inputs_embeds=h,
                                           reduction=reduction, visual_mask=self.visual_mask(ids, reduction))

    def decode(self, tokens, cache):
        return self.language_model.decode(tokens, cache)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Autoregressive answer; kwargs as `hybridvlm.generate.generate`,
        plus `pixel_values_videos` or `pixel_values`, and `reduction`."""
        from hybridvlm.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)
