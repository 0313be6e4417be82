"""Importing this module registers every method (each file calls ``register`` at import)."""

from . import full, lora  # noqa: F401
from . import adalora, longlora, qlora  # noqa: F401
from . import adapter, p_tuning, prompt_tuning  # noqa: F401
from . import prefix_tuning, p_tuning_v2  # noqa: F401
