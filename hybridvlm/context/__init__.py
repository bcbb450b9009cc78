"""Context parallelism: the prompt split along a "sequence" mesh axis."""
