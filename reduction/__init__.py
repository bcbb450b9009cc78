"""Query-conditioned visual-token reduction (scoring, plans, static-shape pruning).

Not implemented yet: this package is reserved by the design card and is
filled by the token-reduction issue.
"""
