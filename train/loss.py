"""Answer-token cross-entropy that computes only the answer positions' logits.

The data pipeline (`hybridvlm.data.layout`) gives `labels` (b, L) aligned with the
logits (labels[r, c] is what the logits at column c predict; -100 elsewhere) and
`loss_mask` (b, L) = labels != -100. The full forward would build a (b, T', vocab)
float32 logits tensor (T' ~ 10^4, vocab ~ 1.3 * 10^5 at the paper's scale: several GiB
per row); here the model returns its final hidden states and the columns they sit at
(`NemotronHVLModel.hidden_states`), the answer columns are located among the survivors
of pruning, and the LM head runs on (b, k, d) only.

Where a column sits after pruning: EVS and a reduction plan drop visual tokens only and
keep order, so a text column c of row r moves left by the number of tokens dropped
before it. `hidden_states` returns, for every surviving slot j, its original column
`columns[r, j]` (ascending); the slot of column c is the number of survivors before it,
`sum(columns[r] < c)`, and `columns[r, slot] == c` confirms it survived.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hybridvlm.data.layout import IGNORE

def answer_columns(loss_mask, max_answer_tokens: int = 1):
    """The first `max_answer_tokens` answer columns of each row.

    Args:
      loss_mask: (b, L) bool.
      max_answer_tokens: static k; the pipeline has one answer token per row (the
        letter at the last column). A row with more than k answer tokens counts
        only its first k.
    Returns:
      columns (b, k) int32 (ascending; arbitrary where absent) and present (b, k) bool.
    """
    b, length = loss_mask.shape
    k = min(int(max_answer_tokens), length)
    if k < 1:
        raise ValueError(f"max_answer_tokens must be >= 1, got {max_answer_tokens}")
    cols = jnp.argsort(~loss_mask, axis=1, stable=True)[:, :k].astype(jnp.int32)
    return cols, jnp.take_along_axis(loss_mask, cols, axis=1)


def survivor_slots(columns, wanted):
    """Where original columns sit after pruning.

    Args:
      columns: (b, t') int32, the original column of each surviving token, ascending
        per row (`NemotronHVLModel.hidden_states`).
      wanted: (b, k) int32 original columns.
    Returns:
      slots (b, k) int32 in [0, t'), and found (b, k) bool: the column survived.
    """
    t = columns.shape[1]
    slots = jnp.sum(columns[:, None, :] < wanted[:, :, None], axis=-1, dtype=jnp.int32)
    slots = jnp.minimum(slots, t - 1)
    return slots, jnp.take_along_axis(columns, slots, axis=1) == wanted


def _weights(batch, mask, k: int):
    """(b, k) columns of `mask` (b, L) and their weights: present on valid rows (`batch["valid"]`,
    all rows when absent)."""
    cols, present = answer_columns(mask, k)
    valid = batch.get("valid")
    if valid is not None:
        present = present & valid[:, None]
    return cols, present


def text_weights(batch, max_text_tokens: int):
    """(b, k) text-loss columns and weights (`text_labels` != -100 on valid rows), as
    `answer_weights`; their sum is the text loss's normaliser."""
    return _weights(batch, batch["text_labels"] != IGNORE, max_text_tokens)


def answer_weights(batch, max_answer_tokens: int = 1):
    """(b, k) answer columns and their weights from the batch alone (no model).

    Weights are 1 on present answer tokens of valid rows (`batch["valid"]`, all rows
    when absent). Their sum is the loss's normaliser, known before the forward pass
    (so micro-batches of one step share it).
    """
    return _weights(batch, batch["loss_mask"], max_answer_tokens)


def best_choice(logits, batch, answer_ids):
    """(b, k) int32: the token id of each answer position's best-scored choice.

    logits (b, k, vocab); the choices are batch["choice_ids"] (b, c) (-1 = none) when
    present, else `answer_ids` for every row.
    """
    if "choice_ids" in batch:
        ids = jnp.asarray(batch["choice_ids"], jnp.int32)  # (b, c)
    else:
        ids = jnp.broadcast_to(jnp.asarray(answer_ids, jnp.int32), (logits.shape[0], len(answer_ids)))
    scores = jnp.take_along_axis(logits, jnp.maximum(ids, 0)[:, None, :], axis=-1)  # (b, k, c)
    scores = jnp.where(ids[:, None, :] >= 0, scores, -jnp.inf)
    pick = jnp.argmax(scores, axis=-1)  # (b, k)
    return jnp.take_along_axis(ids, pick, axis=1)


def _gathered_ce(model, h, columns, cols, labels_full, weight):
    """Cross-entropy (b, k) of the logits at original columns `cols` (located among the
    survivors `columns`), their labels (b, k) and the weights with missing columns off."""
    slots, found = survivor_slots(columns, cols)
    weight = weight & found  # always found in a bucket's layout (text is never pruned)
    h_k = jnp.take_along_axis(h, slots[..., None], axis=1)  # (b, k, d)
    logits = model.language_model.logits(h_k)  # (b, k, vocab) float32
    labels = jnp.where(weight, jnp.take_along_axis(labels_full, cols, axis=1), 0)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels), logits, labels, weight


def answer_loss(model, batch, *, answer_ids, reduction=None, remat=None, normalizer=None,
                max_answer_tokens: int = 1, per_row: bool = False, text_weight: float = 0.0,
                max_text_tokens: int = 0, text_normalizer=None, sequence=None):
    """Cross-entropy and multiple-choice accuracy on the answer tokens only.

    Args:
      model: a `NemotronHVLModel` (its parameters in the compute dtype).
      batch: dict with input_ids (b, L) int32, attention_mask (b, L) bool,
        pixel_values_videos (b, Bt, C, H, W), labels (b, L) int32, loss_mask (b, L)
        bool and optionally choice_ids (b, c) int32 (each row's options' token ids, -1
        past them) and valid (b,) bool (False: padding row, never counted).
      answer_ids: (num_letters,) int token ids of the option letters
        (`hybridvlm.data.pipeline_config.answer_token_ids`), the choices of a batch
        without choice_ids.
      reduction: a static ReductionPlan or None; remat: a REMAT_POLICIES name or None.
      normalizer: the number of answer tokens the loss is averaged over (a scalar;
        default: this batch's, `sum(answer_weights(batch)[1])`); gradient
        accumulation passes the whole step's count so micro-batch losses add up.
      max_answer_tokens: static k, as `answer_columns`.
      text_weight: static; > 0 adds text_weight x the mean cross-entropy of the text after
        the video (batch["text_labels"], its first `max_text_tokens` per row; averaged over
        `text_normalizer` tokens, default this batch's): a dense signal of what the video
        holds (the question's and options' words), on top of the one answer per row.
      sequence: None or a `hybridvlm.context.SequenceParallel`: the LM's layers run split
        along that mesh axis (context parallelism; the same loss).
    Returns:
      loss (scalar float32: sum of the answer tokens' cross-entropies / normalizer, plus
      the text term) and a dict of float32 scalars: loss_sum (answer tokens only), tokens
      (answer tokens counted), with a text term text_loss_sum and text_tokens too,
      correct (answer tokens whose best-scored choice is the label); with
      `per_row`, also row_correct and row_tokens (b,), the same counts per row.
    """
    cols, weight = answer_weights(batch, max_answer_tokens)
    h, columns = model.hidden_states(batch["input_ids"], pixel_values_videos=batch["pixel_values_videos"],
                                     attention_mask=batch["attention_mask"], reduction=reduction, remat=remat,
                                     sequence=sequence)
    ce, logits, labels, weight = _gathered_ce(model, h, columns, cols, batch["labels"], weight)  # (b, k)
    w = weight.astype(jnp.float32)
    loss_sum = jnp.sum(ce * w)
    tokens = jnp.sum(w)
    if normalizer is None:
        normalizer = tokens
    loss = loss_sum / jnp.maximum(jnp.asarray(normalizer, jnp.float32), 1.0)
    hits = jnp.where(best_choice(logits, batch, answer_ids) == labels, w, 0.0)  # (b, k)
    aux = dict(loss_sum=jax.lax.stop_gradient(loss_sum), tokens=tokens, correct=jnp.sum(hits))
    if text_weight > 0:
        if max_text_tokens < 1:
            raise ValueError(f"a text loss needs max_text_tokens >= 1, got {max_text_tokens}")
        tcols, tweight = text_weights(batch, max_text_tokens)
        tce, _, _, tweight = _gathered_ce(model, h, columns, tcols, batch["text_labels"], tweight)
        tw = tweight.astype(jnp.float32)
        text_sum, text_tokens = jnp.sum(tce * tw), jnp.sum(tw)
        if text_normalizer is None:
            text_normalizer = text_tokens
        loss = loss + text_weight * text_sum / jnp.maximum(jnp.asarray(text_normalizer, jnp.float32), 1.0)
        aux.update(text_loss_sum=jax.lax.stop_gradient(text_sum), text_tokens=text_tokens)
    if per_row:
        aux.update(row_correct=jnp.sum(hits, axis=1), row_tokens=jnp.sum(w, axis=1))
    return loss, aux
