"""Importing this module registers every objective (each file calls ``register`` at import)."""

from . import pretrain, sft  # noqa: F401
from . import dpo, ppo, reward  # noqa: F401
from . import grpo  # noqa: F401
from . import orpo  # noqa: F401
from . import kto  # noqa: F401
from . import simpo  # noqa: F401
