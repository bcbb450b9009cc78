"""ml_collections config files (`get_config()`), big_vision style.

Each module's `get_config()` returns a ConfigDict; scripts load them with
`ml_collections.config_flags`, so fields can be overridden on the command
line, e.g. `python -m eval.demo --config.model.hidden_size=128`.
"""

import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """Absolute path of the config file `name` (e.g. "tiny_lm")."""
    return os.path.join(CONFIG_DIR, f"{name}.py")
