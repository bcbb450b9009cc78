"""Video question-answering data: records, SynthVideoQA, benchmark readers, grain pipelines.

Both `train/` and `eval/` import from here; nothing here imports them.
"""
