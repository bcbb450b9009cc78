"""Batches whose rows hold videos of different lengths (frame buckets, masked slots).

Each row's result is compared with the row run alone (its own prompt, no
padding, a plan built for its own visual count), under `jax.jit` and in
`generate`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hybridvlm
from hybridvlm import NemotronHForCausalLM
from hybridvlm.batch import frame_bucket, pad_video_batch
from reduction.plan import PlanError, ReductionPlan
from reduction.prune import stage_order

PAT = "M-*M*-M*-"
V = 24  # visual slots per row (the bucket)
IMG = 63  # LM tests: the visual placeholder id
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "vlm", "omni_video")


# ----------------------------------------------------------------------------- selection (pure arrays)


def test_stage_order_drops_masked_slots_first_and_never_text():
    # Row 0: 4 real visual (scores 4, 1, 3, 2) + 2 masked slots; row 1: 6 real.
    # Row 2 holds only 2 slots (out of contract): it must lose padding, never text.
    valid = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1],
                      [1, 1, 1, 1, 1, 1, 1, 1, 1],
                      [0, 0, 0, 0, 1, 1, 1, 1, 1]], bool)
    visual = np.array([[1, 1, 1, 1, 1, 1, 0, 0, 0],
                       [0, 1, 1, 1, 1, 1, 1, 0, 0],
                       [0, 0, 0, 0, 1, 1, 0, 0, 0]], bool)
    scores = np.array([[9, 9, 4, 1, 3, 2, 0, 0, 0],
                       [0, 5, 6, 1, 2, 3, 4, 0, 0],
                       [0, 0, 0, 0, 7, 8, 0, 0, 0]], np.float32)
    f = jax.jit(lambda s, v, m: stage_order(s, v, m, 3, num_visual=6))
    order = np.asarray(f(scores, visual, valid))  # drops 3 per row
    assert order.shape == (3, 6)
    assert order[0].tolist() == [2, 4, 5, 6, 7, 8]  # masked 0, 1 and the lowest real (pos 3) go
    assert order[1].tolist() == [0, 1, 2, 6, 7, 8]  # top-3 of the 6 real: scores 5, 6, 4
    # Out of contract: both slots go, then the earliest padding; the text stays.
    assert order[2].tolist() == [1, 2, 3, 6, 7, 8]
    uniform = np.asarray(jax.jit(lambda s, v, m: stage_order(s, v, m, 2, num_visual=6, selector="uniform"))(
        scores, visual, valid))
    # Row 0: 4 real tokens at positions 2..5, keep 2 evenly spaced: ranks 1, 3 -> positions 3, 5.
    assert uniform[0].tolist() == [3, 5, 6, 7, 8]


# ----------------------------------------------------------------------------- LM rows


@pytest.fixture(scope="module")
def lm():
    from conftest import tiny_config

    return NemotronHForCausalLM(tiny_config(pattern=PAT, chunk_size=8), rngs=nnx.Rngs(0))


def _row(seed, n_visual, prefix=4, question=6):
    """One row's own prompt: prefix text, n_visual visual tokens, question."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([rng.integers(3, 60, prefix), np.full(n_visual, IMG), rng.integers(3, 60, question)])
    return ids.astype(np.int32)


def _batch(rows, length):
    """Bucket layout: [pad][masked slots][row] per row."""
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), bool)
    for r, row in enumerate(rows):
        n_masked = V - int(np.sum(row == IMG))
        laid = np.concatenate([np.full(n_masked, IMG), row])
        ids[r, length - laid.size:] = laid
        mask[r, length - row.size:] = True
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(ids == IMG)


def _own_plan(plan, n_real):
    """The plan a row of n_real visual tokens gets alone: keep min(keep, n_real) at each stage."""
    return ReductionPlan(num_layers=plan.num_layers, num_visual=n_real,
                         stages=tuple((layer, min(keep, n_real)) for layer, keep in plan.stages),
                         selector=plan.selector)


def _fwd(model, ids, mask, visual, plan):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, i, a, v: nnx.merge(graphdef, s)(i, attention_mask=a, visual_mask=v, reduction=plan))
    return np.asarray(f(state, ids, mask, visual))


ROWS = [(0, 24, 6), (1, 13, 6), (2, 5, 9)]  # (seed, real visual tokens, question length)


@pytest.mark.parametrize("plan_stages", [None, ((1, V), (4, V)), ((1, 16), (4, 6)), ((2, 10), (6, 3))])
def test_each_row_equals_the_row_alone(lm, plan_stages):
    rows = [_row(s, n, question=q) for s, n, q in ROWS]
    length = max(r.size + V - int(np.sum(r == IMG)) for r in rows) + 2
    ids, mask, visual = _batch(rows, length)
    plan = None if plan_stages is None else ReductionPlan(num_layers=len(PAT), num_visual=V, stages=plan_stages)
    got = _fwd(lm, ids, mask, visual if plan else None, plan)
    for r, row in enumerate(rows):
        n = int(np.sum(row == IMG))
        own = None if plan is None else _own_plan(plan, n)
        alone = _fwd(lm, jnp.asarray(row[None]), jnp.ones((1, row.size), bool),
                     jnp.asarray(row[None] == IMG) if own else None, own)[0]
        # The row's surviving tokens are its last ones (padding and masked slots sit left).
        np.testing.assert_allclose(got[r, -alone.shape[0]:], alone, atol=2e-5, rtol=0, err_msg=f"row {r}")


def test_generate_rows_of_different_lengths(lm):
    rows = [_row(s, n, question=q) for s, n, q in ROWS]
    ids, mask, visual = _batch(rows, 40)
    plan = ReductionPlan(num_layers=len(PAT), num_visual=V, stages=((1, 12), (4, 6)))
    for p in (None, plan):
        out = np.asarray(lm.generate(ids, mask, max_new_tokens=4, stop_tokens=(), reduction=p,
                                     visual_mask=visual if p else None))
        for r, row in enumerate(rows):
            own = None if p is None else _own_plan(p, int(np.sum(row == IMG)))
            alone = lm.generate(row[None], max_new_tokens=4, stop_tokens=(), reduction=own,
                                visual_mask=(row[None] == IMG) if own else None)
            np.testing.assert_array_equal(out[r], np.asarray(alone)[0], err_msg=f"row {r}, plan {p}")


def test_layouts_a_plan_cannot_serve_are_refused(lm):
    rows = [_row(0, 24), _row(1, 13)]
    ids, mask, visual = _batch(rows, 40)
    plan = ReductionPlan(num_layers=len(PAT), num_visual=V, stages=((1, 6),))
    short = visual.at[1].set(visual[1] & mask[1])  # row 1's masked slots unmarked: 13 slots, not 24
    with pytest.raises(PlanError, match=r"expects 24 visual tokens per row .*row 1: 13"):
        lm(ids, attention_mask=mask, visual_mask=short, reduction=plan)
    with pytest.raises(PlanError, match="only 40 tokens"):
        lm(ids, attention_mask=mask, visual_mask=visual,
           reduction=ReductionPlan(num_layers=len(PAT), num_visual=41, stages=((1, 6),)))
    with pytest.raises(PlanError, match=r"expects 24 visual .*row 1: 13"):
        lm.generate(ids, mask, max_new_tokens=2, reduction=plan, visual_mask=short)


# ----------------------------------------------------------------------------- VLM rows


@pytest.fixture(scope="module")
def fixture_vlm():
    return hybridvlm.from_pretrained(FIXTURE), np.load(os.path.join(FIXTURE, "expected.npz"))


def _video_prompt(n, question=(90, 120, 121)):
    """The fixture's prompt layout for n tubelets (4 tokens each)."""
    ids = [1, 17, 42]
    for i in range(n):
        ids += [13, 20 + i, 30, 40, 251] + [250] * 4 + [252]
    return np.asarray(ids + list(question), np.int32)


def _vlm_fwd(vlm, ids, mask, pixels, plan=None):
    graphdef, state = nnx.split(vlm)
    f = jax.jit(lambda s, i, a, p: nnx.merge(graphdef, s)(i, attention_mask=a, pixel_values_videos=p, reduction=plan))
    return np.asarray(f(state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels)))


@pytest.mark.parametrize("evs", [0.0, 0.5])
def test_vlm_rows_of_different_lengths(fixture_vlm, evs):
    base, e = fixture_vlm
    vlm = base if evs == 0 else hybridvlm.from_pretrained(FIXTURE, video_pruning_rate=evs)
    pv = e["pixel_values_videos"][0]  # (3, 6, 32, 32)
    counts = (3, 1, 2)
    rows = [(_video_prompt(n, question=(90, 120 + n)), pv[:n]) for n in counts]
    ids, mask, pixels = pad_video_batch(rows, bucket=3, tokens_per_tubelet=4, image_token_id=250,
                                        pad_token_id=0)
    assert ids.shape == (3, rows[0][0].size) and pixels.shape == (3, 3, 6, 32, 32)
    got = _vlm_fwd(vlm, ids, mask, pixels)
    slots = vlm.visual_slots(1, pixels[:1])
    plan = ReductionPlan(num_layers=vlm.text_config.num_layers, num_visual=slots, stages=((1, 5), (3, 2)))
    got_plan = _vlm_fwd(vlm, ids, mask, pixels, plan)
    for r, (row, tub) in enumerate(rows):
        alone = _vlm_fwd(vlm, row[None], np.ones((1, row.size), bool), tub[None])[0]
        np.testing.assert_allclose(got[r, -alone.shape[0]:], alone, atol=2e-5, rtol=0, err_msg=f"row {r}")
        own_slots = vlm.visual_slots(1, tub[None])
        own = _own_plan(plan, own_slots)
        alone = _vlm_fwd(vlm, row[None], np.ones((1, row.size), bool), tub[None], own)[0]
        np.testing.assert_allclose(got_plan[r, -alone.shape[0]:], alone, atol=2e-5, rtol=0, err_msg=f"plan row {r}")


def test_vlm_refuses_a_plan_for_another_bucket_before_tracing(fixture_vlm):
    vlm, e = fixture_vlm
    rows = [(_video_prompt(3), e["pixel_values_videos"][0]), (_video_prompt(1), e["pixel_values_videos"][0][:1])]
    ids, mask, pixels = pad_video_batch(rows, bucket=3, tokens_per_tubelet=4, image_token_id=250, pad_token_id=0)
    plan = ReductionPlan(num_layers=vlm.text_config.num_layers, num_visual=4, stages=((1, 2),))
    with pytest.raises(PlanError, match="expects 4 visual tokens per row, the input's shapes give 12"):
        _vlm_fwd(vlm, ids, mask, pixels, plan)  # traced ids: the count comes from the pixel shapes
    with pytest.raises(PlanError, match="expects 4 visual tokens"):
        vlm.generate(ids, mask, max_new_tokens=2, pixel_values_videos=jnp.asarray(pixels), reduction=plan)


def test_pad_video_batch_layout_and_errors():
    tub = np.ones((2, 6, 32, 32), np.float32)
    row = _video_prompt(2)
    ids, mask, pixels = pad_video_batch([(row, tub)], bucket=3, tokens_per_tubelet=4, image_token_id=250,
                                        pad_token_id=0, length=row.size + 6)
    assert ids.shape == (1, row.size + 6) and pixels.shape == (1, 3, 6, 32, 32)
    assert ids[0, :2].tolist() == [0, 0] and ids[0, 2:6].tolist() == [250] * 4  # pad, then the masked slots
    assert not mask[0, :6].any() and mask[0, 6:].all() and (ids[0, 6:] == row).all()
    assert (pixels[0, 2] == 0).all() and (pixels[0, :2] == 1).all()
    with pytest.raises(ValueError, match="row 0: 2 tubelets do not fit the frame bucket of 1"):
        pad_video_batch([(row, tub)], bucket=1, tokens_per_tubelet=4, image_token_id=250, pad_token_id=0)
    with pytest.raises(ValueError, match="row 0: the prompt has 8 placeholders .* 3 tubelets give 12"):
        pad_video_batch([(row, np.ones((3, 6, 32, 32)))], bucket=3, tokens_per_tubelet=4, image_token_id=250,
                        pad_token_id=0)
    assert frame_bucket(5, (8, 16, 32)) == 8 and frame_bucket(16, (8, 16, 32)) == 16
    with pytest.raises(ValueError, match="longer than the largest frame bucket"):
        frame_bucket(33, (8, 16, 32))
