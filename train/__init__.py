"""Sharded finetuning under token reduction (mesh, optimizer, checkpoints, input).

Not implemented yet: this package is reserved by the design card and is
filled by the finetuning issue.
"""
