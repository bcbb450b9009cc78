"""Sharded finetuning under token reduction.

Built so far (issue 11): `mesh.py` (the ("data", "fsdp", "sequence", "tensor") device
mesh), `optim.py` (AdamW, warmup + cosine, clipping, decay and freeze masks),
`loss.py` (cross-entropy and accuracy on the answer tokens only), `step.py`
(the jitted train step: bf16 compute on float32 master weights, micro-batch
accumulation, remat, a static plan per frame bucket), `checkpoint.py`
(Orbax train-state + iterator + config checkpoints, preemption). The rule
table of parameter and activation shardings is `hybridvlm.sharding`. `finetune.py`
is the loop that ties them together; `pretrain_vision.py` is the tower's perception
stage before it (SynthVideoQA ground truth, one device).
"""
