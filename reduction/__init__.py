"""Query-conditioned visual-token reduction for hybrid (Mamba-2 + attention) VLMs.

Modules:
  plan    static, hashable `ReductionPlan`s (where / how many visual tokens are
          kept) and the schedule builders: progressive (low-to-high), fastv,
          pyramid, uniform_stride, random_plan;
  scores  language-aware scores of visual tokens from the text query rows:
          attention softmax and the Mamba-2 implicit-attention proxy;
  evs     Efficient Video Sampling, the query-agnostic pruning before the LM;
  prune   static-shape selection and removal of tokens inside the LM.
"""

from reduction.evs import evs_keep_count, evs_keep_indices, evs_retention_mask, evs_scores
from reduction.plan import (PlanError, ReductionPlan, fastv, layers_of_kind, progressive, pyramid,
                            random_plan, uniform_stride)
from reduction.scores import ScoreConfig, attention_scores, implicit_attention_matrix, mamba_scores

__all__ = [
    "PlanError", "ReductionPlan", "ScoreConfig", "attention_scores", "evs_keep_count", "evs_keep_indices",
    "evs_retention_mask", "evs_scores", "fastv", "implicit_attention_matrix", "layers_of_kind",
    "mamba_scores", "progressive", "pyramid", "random_plan", "uniform_stride",
]
