"""`ConfigError`, the one-line error of a bad run config or DeepSpeed config.

It lives here so that ds_cl/training/config.py (which reads the DeepSpeed config through
ds_cl/training/ds_config.py) and ds_config.py share it without an import cycle. Import it from
ds_cl.training.config, as everything does: it is the same class.
"""


class ConfigError(ValueError):
    """A bad run config: the message names the file and the key."""
