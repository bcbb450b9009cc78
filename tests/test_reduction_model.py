"""Static-shape visual-token pruning inside the model (`reduction=`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridvlm import NemotronHForCausalLM
from hybridvlm.cache import Layout
from reduction.plan import PlanError, ReductionPlan

VIS = 24  # visual tokens per row
PAT = "M-*M*-M*-"


@pytest.fixture(scope="module")
def model(request):
    from conftest import tiny_config

    return NemotronHForCausalLM(tiny_config(pattern=PAT, chunk_size=8), rngs=nnx.Rngs(0))


def _prompt(seed, b=2, prefix=5, question=7, pad=(0, 3)):
    """Left-padded rows: [pad] prefix text, VIS visual tokens, question text."""
    rng = np.random.default_rng(seed)
    t = max(pad) + prefix + VIS + question
    ids = rng.integers(3, 64, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    visual = np.zeros((b, t), bool)
    for r, p in enumerate(pad[:b]):
        mask[r, :p] = False
        ids[r, :p] = 0
        start = max(pad) + prefix
        visual[r, start:start + VIS] = True
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(visual)


def _fwd(model, ids, mask, visual, plan):
    return nnx.jit(lambda m, i, a, v: m(i, attention_mask=a, visual_mask=v, reduction=plan))(model, ids, mask, visual)


def test_keep_all_plan_equals_unreduced(model):
    ids, mask, visual = _prompt(0)
    plan = ReductionPlan(num_layers=len(PAT), num_visual=VIS, stages=((1, VIS), (4, VIS)))
    full = model(ids, attention_mask=mask)
    got = _fwd(model, ids, mask, visual, plan)
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(full)[valid], atol=1e-5, rtol=0)


def test_uniform_pruning_matches_manual_gather(model):
    """Pruning before layer 3 equals running layers 0-2, dropping the tokens
    picked by an independent numpy rule, then running the rest."""
    ids, mask, visual = _prompt(1)
    keep = 8
    plan = ReductionPlan(num_layers=len(PAT), num_visual=VIS, stages=((3, keep),), selector="uniform")
    got = np.asarray(_fwd(model, ids, mask, visual, plan))

    h = model.embed_tokens(ids)
    layout = Layout.prompt(mask)
    for layer in model.layers[:3]:
        h, _ = layer(h, layout)
    order = []
    for r in range(ids.shape[0]):
        vis_pos = np.flatnonzero(np.asarray(visual[r]))
        kept = vis_pos[((np.arange(keep) + 0.5) * VIS / keep).astype(int)]
        order.append(np.sort(np.concatenate([np.flatnonzero(~np.asarray(visual[r])), kept])))
    order = jnp.asarray(np.stack(order))
    h = jnp.take_along_axis(h, order[..., None], axis=1)
    layout = layout.take(order)
    for layer in model.layers[3:]:
        h, _ = layer(h, layout)
    want = np.asarray(model.logits(h))
    assert got.shape == (2, ids.shape[1] - (VIS - keep), 64)
    valid = np.asarray(layout.valid)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5, rtol=0)


def test_score_pruning_is_per_example(model):
    ids, mask, visual = _prompt(2, pad=(0, 0))
    plan = ReductionPlan(num_layers=len(PAT), num_visual=VIS, stages=((1, 16), (4, 6)))
    both = np.asarray(_fwd(model, ids, mask, visual, plan))
    for r in range(2):
        alone = np.asarray(_fwd(model, ids[r:r + 1], mask[r:r + 1], visual[r:r + 1], plan))
        np.testing.assert_allclose(both[r], alone[0], atol=1e-5, rtol=0)
    assert both.shape[1] == ids.shape[1] - (VIS - 6)


def test_scores_choose_different_tokens_than_uniform(model):
    ids, mask, visual = _prompt(3)
    kw = dict(num_layers=len(PAT), num_visual=VIS, stages=((2, 6),))
    by_score = np.asarray(_fwd(model, ids, mask, visual, ReductionPlan(**kw)))
    uniform = np.asarray(_fwd(model, ids, mask, visual, ReductionPlan(**kw, selector="uniform")))
    assert np.abs(by_score[:, -1] - uniform[:, -1]).max() > 1e-4


def test_second_video_and_question_do_not_recompile(model):
    plan = ReductionPlan(num_layers=len(PAT), num_visual=VIS, stages=((1, 12), (4, 6)))
    fwd = jax.jit(lambda state, i, a, v: nnx.merge(graphdef, state)(i, attention_mask=a, visual_mask=v, reduction=plan))
    graphdef, state = nnx.split(model)
    fwd(state, *_prompt(4))
    before = fwd._cache_size()
    fwd(state, *_prompt(5))  # different tokens, same shapes
    assert fwd._cache_size() == before == 1


def test_decode_after_reduced_prefill_matches_reduced_forward(model):
    """With a query-independent selector, prefill + decode equals a reduced
    forward over the prompt plus the generated tokens."""
    ids, mask, visual = _prompt(6)
    plan = ReductionPlan(num_layers=len(PAT), num_visual=VIS, stages=((1, 12), (4, 6)), selector="uniform")
    n = 5
    out = np.asarray(model.generate(ids, mask, max_new_tokens=n, stop_tokens=(), reduction=plan,
                                    visual_mask=visual))
    seq = np.concatenate([np.asarray(ids), out], axis=1)
    m2 = np.concatenate([np.asarray(mask), np.ones_like(out, bool)], axis=1)
    v2 = np.concatenate([np.asarray(visual), np.zeros_like(out, bool)], axis=1)
    logits = np.asarray(_fwd(model, jnp.asarray(seq), jnp.asarray(m2), jnp.asarray(v2), plan))
    # Greedy tokens are the argmax of the reduced forward at the positions before them.
    np.testing.assert_array_equal(np.argmax(logits[:, -n - 1:-1], -1), out)


def test_generate_keep_all_equals_unreduced(model):
    ids, mask, visual = _prompt(7)
    plan = ReductionPlan(num_layers=len(PAT), num_visual=VIS, stages=((2, VIS),))
    a = model.generate(ids, mask, max_new_tokens=6, stop_tokens=())
    b = model.generate(ids, mask, max_new_tokens=6, stop_tokens=(), reduction=plan, visual_mask=visual)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_plans_are_refused(model):
    ids, mask, visual = _prompt(8)
    with pytest.raises(ValueError, match="expects 20 visual tokens"):
        model(ids, attention_mask=mask, visual_mask=visual,
              reduction=ReductionPlan(num_layers=len(PAT), num_visual=20, stages=((1, 10),)))
    with pytest.raises(ValueError, match="plan is for 5 layers"):
        model(ids, attention_mask=mask, visual_mask=visual, reduction=ReductionPlan(num_layers=5, num_visual=VIS))
    with pytest.raises(ValueError, match="needs visual_mask"):
        model(ids, attention_mask=mask, reduction=ReductionPlan(num_layers=len(PAT), num_visual=VIS))
    with pytest.raises(PlanError, match="must not rise"):
        ReductionPlan(num_layers=len(PAT), num_visual=VIS, stages=((1, 10), (3, 12)))


def test_builder_plans_run_at_every_layer_kind(model):
    """Per-layer plans put stages before MLP layers too, the last one included."""
    from reduction.plan import progressive

    ids, mask, visual = _prompt(9)
    plan = progressive(len(PAT), VIS, 0.5, shape="linear")
    assert any(PAT[layer] == "-" for layer, _ in plan.stages) and plan.stages[-1][0] == len(PAT) - 1
    out = np.asarray(_fwd(model, ids, mask, visual, plan))
    assert out.shape[1] == ids.shape[1] - (VIS - plan.stages[-1][1]) and np.isfinite(out).all()


def test_vlm_generate_with_reduction():
    """On the golden VLM: a keep-all plan reproduces the reference answer; a
    25% progressive plan runs and prunes."""
    import os

    import hybridvlm
    from reduction.plan import progressive

    d = os.path.join(os.path.dirname(__file__), "fixtures", "vlm", "omni_video")
    e = np.load(os.path.join(d, "expected.npz"))
    vlm = hybridvlm.from_pretrained(d)
    pv = jnp.asarray(e["pixel_values_videos"])
    L, V = vlm.text_config.num_layers, 12
    keep_all = ReductionPlan(num_layers=L, num_visual=V, stages=((1, V),))
    out = vlm.generate(e["input_ids"], max_new_tokens=20, stop_tokens=(), pixel_values_videos=pv, reduction=keep_all)
    np.testing.assert_array_equal(np.asarray(out), e["greedy_tokens"])
    plan = progressive(L, V, 0.25)
    logits = vlm(jnp.asarray(e["input_ids"]), pixel_values_videos=pv, reduction=plan)
    assert logits.shape[1] == e["input_ids"].shape[1] - (V - plan.schedule[-1])
    out = vlm.generate(e["input_ids"], max_new_tokens=4, pixel_values_videos=pv, reduction=plan)
    assert out.shape == (1, 4)


def test_evs_composes_with_a_plan():
    """EVS (before the LM) then a plan inside it: the EVS-pruned forward equals
    the LM run on the embeddings of the retained tokens, selected independently."""
    import os

    import hybridvlm
    from reduction.evs import evs_keep_count
    from reduction.plan import progressive

    d = os.path.join(os.path.dirname(__file__), "fixtures", "vlm", "omni_video")
    e = np.load(os.path.join(d, "expected.npz"))
    vlm = hybridvlm.from_pretrained(d, video_pruning_rate=0.5)
    ids, pv = jnp.asarray(e["input_ids"]), jnp.asarray(e["pixel_values_videos"])
    kept = evs_keep_count(3, 4, 0.5)  # 3 tubelets x 4 tokens
    assert kept == 6
    out = vlm(ids, pixel_values_videos=pv)
    assert out.shape[1] == ids.shape[1] - (12 - kept)

    # Independent selection: numpy cosine dissimilarity to the previous tubelet.
    emb = np.asarray(vlm.video_embeddings(pv)).reshape(3, 4, -1)
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    score = np.concatenate([np.full(4, np.inf), 1 - (unit[1:] * unit[:-1]).sum(-1).ravel()])
    keep_vis = np.sort(np.argsort(-score, kind="stable")[:kept])
    vis_pos = np.flatnonzero(np.asarray(ids[0]) == vlm.config.image_token_id)
    order = np.sort(np.concatenate([np.flatnonzero(np.asarray(ids[0]) != vlm.config.image_token_id), vis_pos[keep_vis]]))
    h = vlm.embed(ids, pv)[:, order]
    want = vlm.language_model(ids[:, order], inputs_embeds=h)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=0)

    plan = progressive(vlm.text_config.num_layers, kept, 0.5)
    res = vlm.generate(ids, max_new_tokens=3, pixel_values_videos=pv, reduction=plan)
    assert res.shape == (1, 3)
    with pytest.raises(ValueError, match="expects 12 visual tokens"):
        vlm.generate(ids, max_new_tokens=3, pixel_values_videos=pv,
                     reduction=ReductionPlan(num_layers=vlm.text_config.num_layers, num_visual=12))


def test_scoring_projection_equals_full_projection():
    """The cheap B/C/dt-only projection used for scoring equals the mixer's own."""
    from conftest import tiny_config
    from hybridvlm.layers.mamba2 import Mamba2Mixer

    cfg = tiny_config(pattern="M", use_bias=True, chunk_size=8)
    mixer = Mamba2Mixer(cfg, rngs=nnx.Rngs(3))
    # Non-zero biases so that their slicing is checked too.
    for i, bias in enumerate((mixer.B_proj_bias, mixer.C_proj_bias, mixer.dt_proj_bias, mixer.conv_B_bias,
                              mixer.conv_C_bias)):
        bias.set_value(jax.random.normal(jax.random.key(i + 1), bias.shape))
    x = jax.random.normal(jax.random.key(0), (2, 11, cfg.hidden_size))
    layout = Layout.prompt(jnp.asarray(np.arange(11)[None] >= np.array([[0], [3]])))
    full, cheap = mixer.project(x, layout), mixer.project_scoring(x, layout)
    for k in ("B", "C", "dt", "A"):
        np.testing.assert_allclose(np.asarray(cheap[k]), np.asarray(full[k]), atol=1e-6, rtol=0, err_msg=k)


def test_mixer_implicit_attention_reproduces_its_ssd_output():
    """With the decay term, the implicit-attention matrix built from a real
    mixer's B, C, dt, A, applied to its SSD input x, gives its SSD output."""
    from conftest import tiny_config
    from hybridvlm.layers.mamba2 import Mamba2Mixer
    from hybridvlm.ssd import ssd
    from reduction.scores import implicit_attention_matrix

    cfg = tiny_config(pattern="M", chunk_size=4)
    mixer = Mamba2Mixer(cfg, rngs=nnx.Rngs(5))
    # Steps of order 0.5 and O(1) activations, so the output is far from zero.
    mixer.dt_bias.set_value(jnp.zeros_like(mixer.dt_bias[...]))
    x = 30.0 * jax.random.normal(jax.random.key(4), (2, 13, cfg.hidden_size))
    p = mixer.project(x, Layout.prompt(jnp.ones((2, 13), bool)))
    y, _ = ssd(p["x"], p["dt"], p["A"], p["B"], p["C"], chunk_size=cfg.chunk_size, impl="chunked")
    M = implicit_attention_matrix(p["C"], p["B"], p["dt"], p["A"])  # (b, h, t, t)
    y_from_M = jnp.einsum("bhts,bshp->bthp", M, p["x"].astype(jnp.float32))
    scale = float(jnp.abs(y).max())
    assert scale > 1e-3
    np.testing.assert_allclose(np.asarray(y_from_M), np.asarray(y), atol=1e-5 * scale, rtol=0)
