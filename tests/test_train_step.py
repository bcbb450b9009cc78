"""The train step, loss and optimizer (train/step.py, train/loss.py, train/optim.py).

A cut-down configs/tiny_vlm.py model (one vision block of width 32 on 64x64 frames: 4
visual tokens per tubelet; LM of width 64, pattern "M*-") with numpy-drawn weights
(`eval.bench_data.random_model`: no per-shape random-init compiles). XLA compiles
dominate on 2 cores, so the exactness checks run on small hand-made batches, and one
jitted bf16 step (frozen vision tower) serves the overfit, freeze and compile-count tests.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

from configs import tiny_vlm
from eval.bench_data import random_model
from eval.inputs import tiny_vlm_config
from hybridvlm.batch import pad_video_batch
from hybridvlm.data.pipeline import PipelineConfig, answer_token_ids, train_pipeline
from hybridvlm.data.synth import SynthSource
from hybridvlm.tokenizer import byte_tokenizer
from reduction.plan import ReductionPlan
from train import loss as tl
from train.optim import OptimConfig, decay_mask, freeze_labels, make_optimizer, path_names
from train.step import TrainState, make_train_step, split_model, step_inputs

TOK = byte_tokenizer()
IMG = 261
LETTERS = answer_token_ids(TOK, 4)


def _vlm_config():
    c = tiny_vlm.get_config()
    c.model.update(pattern="M*-", hidden_size=64, intermediate_size=128, mamba_num_heads=4, head_dim=16,
                   attention_impl="naive", seq_block=0, chunk_size=64)
    c.vision.update(num_layers=1, hidden_size=32, num_heads=2, max_img_size=64)
    c.image_size, c.projector_hidden_size = 64, 64
    return tiny_vlm_config(c)


VCFG = _vlm_config()
PER_TUBELET = VCFG.tokens_per_tubelet(64, 64)  # 4


@pytest.fixture(scope="module")
def model():
    return random_model(VCFG, seed=0)


def _small_batch(rows=2, tubelets=2, length=40, seed=0, real=None):
    """Hand-made batch: rows of text + one video (the last row's video may be shorter,
    `real` tubelets), left-padded, the answer letter's id at the last column."""
    rng = np.random.default_rng(seed)
    laid = []
    for r in range(rows):
        n_tub = tubelets if real is None or r < rows - 1 else real
        text = rng.integers(40, 120, size=6 + 3 * r)
        ids = np.concatenate([[1], text[:3], np.full(n_tub * PER_TUBELET, IMG), text[3:]])
        laid.append((ids, rng.normal(size=(n_tub, 6, 64, 64)).astype(np.float32)))
    ids, mask, pixels = pad_video_batch(laid, bucket=tubelets, tokens_per_tubelet=PER_TUBELET, image_token_id=IMG,
                                        pad_token_id=0, length=length)
    labels = np.full(ids.shape, -100, np.int32)
    labels[:, -1] = rng.choice(LETTERS, size=rows)
    return dict(input_ids=ids.astype(np.int32), attention_mask=mask.astype(bool),
                pixel_values_videos=pixels.astype(np.float32), labels=labels, loss_mask=labels != -100,
                valid=np.ones((rows,), bool))


def _plan(tubelets, keep, layer=1):
    return ReductionPlan(num_layers=len(VCFG.text.pattern), num_visual=tubelets * PER_TUBELET,
                         stages=((layer, keep),))


def _leaves(tree):
    return {"/".join(path_names(p)): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------- optimizer


def test_decay_and_freeze_masks_name_exactly_the_intended_parameters(model):
    _, params, _ = split_model(model)
    names = set(_leaves(params))
    no_decay = {n for n, d in _leaves(decay_mask(params)).items() if not d}
    no_decay_leaves = ("A_log", "D", "dt_bias", "conv_x_bias", "conv_B_bias", "conv_C_bias", "bias", "b")
    expected = {n for n in names if n.split("/")[-1] in no_decay_leaves or "norm" in n.rsplit("/", 1)[0]}
    assert no_decay == expected
    for n in ("language_model/layers/0/mixer/A_log", "language_model/layers/0/mixer/D",
              "language_model/layers/0/mixer/dt_bias", "language_model/final_norm/weight",
              "language_model/layers/0/mixer/norm/weight", "projector/norm/weight",
              "vision/blocks/0/norm1/bias", "vision/blocks/0/q/b"):
        assert n in no_decay, n
    for n in ("language_model/embed", "language_model/lm_head", "language_model/layers/1/mixer/q",
              "language_model/layers/0/mixer/x_proj", "projector/linear_1", "vision/blocks/0/q/w"):
        assert n in names - no_decay, n

    def frozen(parts):
        return {n for n, lab in _leaves(freeze_labels(params, parts)).items() if lab == "frozen"}

    assert frozen(("vision",)) == {n for n in names if n.startswith("vision/")}
    assert frozen(("projector",)) == {n for n in names if n.startswith("projector/")}
    assert frozen(("lm",)) == {n for n in names if n.startswith("language_model/")}
    assert frozen(("lm_embed",)) == {"language_model/embed", "language_model/lm_head"}
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['visoin'\]"):
        OptimConfig(freeze=("visoin",))
    with pytest.raises(ValueError, match="freezes every parameter"):
        make_optimizer(OptimConfig(freeze=("vision", "projector", "lm")), params)
    # Frozen parameters carry no optimizer state.
    opt_state = make_optimizer(OptimConfig(freeze=("vision",)), params).init(params)
    adam = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    mu = _leaves(adam[0].mu)
    assert mu and not any(n.startswith("vision/") for n in mu) and "projector/linear_1" in mu
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=10, total_steps=110, end_lr_factor=0.1)
    assert float(cfg.learning_rate_at(0)) == 0.0 and float(cfg.learning_rate_at(5)) == pytest.approx(5e-4)
    assert float(cfg.learning_rate_at(10)) == pytest.approx(1e-3)
    assert float(cfg.learning_rate_at(110)) == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("with_plan", [False, True])
def test_answer_loss_equals_the_loss_of_the_full_logits(model, with_plan):
    batch = _small_batch(rows=3, tubelets=2, real=1, seed=1)
    batch["valid"][1] = False  # a padding row: never counted
    plan = _plan(2, 3) if with_plan else None
    x = {k: jnp.asarray(v) for k, v in batch.items()}

    def full(x):
        logits = model(x["input_ids"], pixel_values_videos=x["pixel_values_videos"],
                       attention_mask=x["attention_mask"], reduction=plan)  # (b, t', V)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, -1], x["labels"][:, -1])
        w = x["valid"].astype(jnp.float32)
        letters = jnp.asarray(LETTERS)
        ok = letters[jnp.argmax(logits[:, -1][:, letters], -1)] == x["labels"][:, -1]
        return jnp.sum(ce * w) / jnp.sum(w), jnp.sum(ok * w), logits.shape[1]

    want, want_correct, t_out = full(x)
    if with_plan:
        assert t_out == 40 - (8 - 3)
    loss, aux = jax.jit(lambda x: tl.answer_loss(model, x, answer_ids=LETTERS, reduction=plan))(x)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6, atol=1e-6)
    assert float(aux["tokens"]) == 2.0 and float(aux["correct"]) == float(want_correct)


def test_text_loss_adds_the_mean_cross_entropy_of_the_text_after_the_video(model):
    from hybridvlm.data.layout import text_labels

    batch = _small_batch(rows=3, tubelets=2, real=1, seed=4)
    batch["valid"][2] = False  # a padding row: its text never counts
    batch["text_labels"] = text_labels(batch["input_ids"], batch["attention_mask"], IMG)
    plan = _plan(2, 3)
    x = {k: jnp.asarray(v) for k, v in batch.items()}
    logits = model(x["input_ids"], pixel_values_videos=x["pixel_values_videos"], attention_mask=x["attention_mask"],
                   reduction=plan)  # (b, t', V); text columns keep their order at the end of each row
    ce, n = 0.0, 0
    for r in range(2):
        ids, mask = batch["input_ids"][r], batch["attention_mask"][r]
        after = np.flatnonzero(mask & (ids == IMG))[-1] + 1  # </img>-equivalent: the first text column after the video
        text_cols = np.arange(after, ids.size - 1)
        assert (batch["text_labels"][r, text_cols] == ids[text_cols + 1]).all()
        assert (np.delete(batch["text_labels"][r], text_cols) == -100).all()
        shift = ids.size - logits.shape[1]  # text is never pruned: it sits at the same distance from the end
        lg = np.asarray(logits[r, text_cols - shift])
        lse = np.log(np.sum(np.exp(lg - lg.max(-1, keepdims=True)), -1)) + lg.max(-1)
        ce += float(np.sum(lse - lg[np.arange(text_cols.size), ids[text_cols + 1]]))
        n += text_cols.size
    base, _ = tl.answer_loss(model, x, answer_ids=LETTERS, reduction=plan)
    loss, aux = tl.answer_loss(model, x, answer_ids=LETTERS, reduction=plan, text_weight=0.5, max_text_tokens=16)
    assert float(aux["text_tokens"]) == n
    np.testing.assert_allclose(float(aux["text_loss_sum"]), ce, rtol=2e-5)
    np.testing.assert_allclose(float(loss), float(base) + 0.5 * ce / n, rtol=2e-5)
    with pytest.raises(ValueError, match="max_text_tokens"):
        tl.answer_loss(model, x, answer_ids=LETTERS, reduction=plan, text_weight=0.5)


def test_accuracy_takes_the_best_of_each_rows_own_choices():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 1, 50)).astype(np.float32)
    # Row 0 has 2 options (ids 7, 9), row 1 four (the letters' places held by other ids), row 2 none.
    choice_ids = np.full((3, 10), -1, np.int32)
    choice_ids[0, :2] = (7, 9)
    choice_ids[1, :4] = (40, 3, 11, 25)
    logits[0, 0, 30] = 99.0  # the best token overall is not a choice of row 0
    got = np.asarray(tl.best_choice(jnp.asarray(logits), {"choice_ids": choice_ids}, LETTERS))
    assert got[0, 0] == (7 if logits[0, 0, 7] > logits[0, 0, 9] else 9)
    assert got[1, 0] == max((40, 3, 11, 25), key=lambda i: logits[1, 0, i])
    # Without choice_ids, every row's choices are the letters.
    got = np.asarray(tl.best_choice(jnp.asarray(np.tile(logits, (1, 2, 1))), {}, LETTERS))
    want = [[max(LETTERS, key=lambda i: logits[r, 0, i])] * 2 for r in range(3)]
    np.testing.assert_array_equal(got, want)


def test_answer_columns_map_through_pruning():
    columns = jnp.asarray([[0, 2, 3, 7, 9], [1, 4, 5, 6, 8]], jnp.int32)
    slots, found = tl.survivor_slots(columns, jnp.asarray([[9, 3], [6, 7]], jnp.int32))
    np.testing.assert_array_equal(np.asarray(slots), [[4, 2], [3, 4]])
    np.testing.assert_array_equal(np.asarray(found), [[True, True], [True, False]])


# ----------------------------------------------------------------------------- step


def _grads(model, batch, remat, plan):
    _, params, rest = split_model(model)
    from flax import nnx
    graphdef = nnx.split(model, nnx.Param, ...)[0]

    def f(p, x):
        return tl.answer_loss(nnx.merge(graphdef, p, rest), x, answer_ids=LETTERS, reduction=plan, remat=remat)[0]

    x = {k: jnp.asarray(v) for k, v in batch.items()}
    return jax.jit(jax.value_and_grad(f))(params, x)


def test_remat_gives_the_same_loss_and_gradients(model):
    batch = _small_batch(rows=2, tubelets=4, length=64, seed=2)
    plan = _plan(4, 8)
    l0, g0 = _grads(model, batch, None, plan)
    l1, g1 = _grads(model, batch, "full", plan)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    a, b = _leaves(g0), _leaves(g1)
    assert a.keys() == b.keys()
    for n in a:
        np.testing.assert_allclose(b[n], a[n], rtol=1e-5, atol=1e-7, err_msg=n)


def test_accumulating_two_micro_batches_equals_one_step_on_the_whole_batch(model):
    batch = _small_batch(rows=4, tubelets=2, length=40, seed=3, real=1)
    graphdef, params, rest = split_model(model)
    out = []
    for acc in (1, 2):
        cfg = OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, accumulate=acc, weight_decay=0.1)
        tx = make_optimizer(cfg, params)
        step = jax.jit(make_train_step(graphdef, rest, tx, optim_config=cfg, answer_ids=LETTERS,
                                       plan_for_bucket={4: _plan(2, 5)}, compute_dtype=jnp.float32))
        out.append(step(TrainState.create(params, tx), batch))
    (s1, m1), (s2, m2) = out
    for k in ("loss", "grad_norm", "accuracy", "answer_tokens"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=2e-6, err_msg=k)
    a, b = _leaves(s1.params), _leaves(s2.params)
    # Adam's first update is lr * g / (|g| + eps) per element: float-rounding differences
    # of near-zero gradients move an element by up to ~lr * 1e-3 (lr = 1e-3).
    for n in a:
        np.testing.assert_allclose(b[n], a[n], rtol=0, atol=5e-6, err_msg=n)


@pytest.fixture(scope="module")
def trained(model):
    """One jitted bf16 step (vision frozen) counted by traces, and a batch per bucket."""
    cfg16 = PipelineConfig.for_model(VCFG, batch_size=2, buckets=(16,))
    cfg4 = PipelineConfig.for_model(VCFG, batch_size=2, buckets=(4,), max_frames=4)
    batches = {}
    for frames, cfg in ((16, cfg16), (4, cfg4)):
        it = iter(train_pipeline(SynthSource(0, 4, 16, frame_size=64), cfg, tokenizer=TOK, shard=(0, 1)))
        batches[frames] = step_inputs(next(it))
        it.close()
    graphdef, params, rest = split_model(model)
    ocfg = OptimConfig(learning_rate=3e-3, warmup_steps=3, total_steps=200, weight_decay=0.0, freeze=("vision",))
    tx = make_optimizer(ocfg, params)
    traces = []

    def counted(state, batch):
        traces.append(batch["input_ids"].shape)
        return fn(state, batch)

    plan16 = _plan(8, 8, layer=1)
    fn = make_train_step(graphdef, rest, tx, optim_config=ocfg, answer_ids=LETTERS,
                         plan_for_bucket={16: plan16, 4: None}, remat_policy="dots_saveable")
    step = jax.jit(counted, donate_argnums=0)
    initial = _leaves(params)
    state = TrainState.create(jax.tree_util.tree_map(jnp.array, params), tx)
    return dict(step=step, traces=traces, batches=batches, initial=initial, state=[state])


def test_training_under_a_plan_decreases_the_loss_and_frozen_params_stay(trained):
    step, batch = trained["step"], trained["batches"][16]
    losses = []
    state = trained["state"][0]
    for _ in range(20):
        state, m = step(state, batch)
        m = {k: float(v) for k, v in m.items()}
        assert all(np.isfinite(list(m.values()))), m
        losses.append(m["loss"])
    trained["state"][0] = state
    assert m["answer_tokens"] == 2.0 and m["learning_rate"] > 0
    assert losses[-1] < 0.5 * losses[0], losses
    now = _leaves(state.params)
    for n, x in trained["initial"].items():
        if n.startswith("vision/"):
            np.testing.assert_array_equal(now[n], x, err_msg=n)
        elif n in ("projector/linear_1", "language_model/layers/0/mixer/x_proj", "language_model/lm_head"):
            assert not np.array_equal(now[n], x), n


def test_the_step_compiles_once_per_bucket(trained):
    step, batches = trained["step"], trained["batches"]
    state = trained["state"][0]
    for frames in (4, 16, 4, 16, 4):
        state, m = step(state, batches[frames])
        assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    trained["state"][0] = state
    assert step._cache_size() == 2
    assert sorted(set(trained["traces"])) == sorted({b["input_ids"].shape for b in batches.values()})
    assert len(trained["traces"]) == 2
