"""The KV cache's name, whichever transformers is installed: ``cache`` from 5.24 on, ``past_key_values`` before.

transformers 5.24 renamed the causal LMs' forward keyword ``past_key_values`` to ``cache`` and the output field
likewise. The old names still work there, but only through shims that warn (a ``FutureWarning`` from
``deprecate_kwarg`` for the keyword, a ``logger.warning_once`` from ``ModelOutput.past_key_values`` for the field),
and ``generate`` passes the new name only. So code that hooks a model's forward must look under both names, and
tuneforge's own calls must use the name the model takes, or every training run prints deprecation warnings.

* :func:`cache_kwarg` -- the keyword a model's forward takes (from its signature; inspect it once per model).
* :func:`cache_from_kwargs` -- the cache a caller passed, under whichever name, and that name.
* :func:`set_cache` -- put a cache back under one name, never both (5.24 warns when both are passed and uses only
  ``cache``; its ``ModelOutput`` raises).
* :func:`output_cache` -- the cache a forward returned, without touching the deprecated property.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from torch import nn

NEW_NAME = "cache"  # transformers >= 5.24
OLD_NAME = "past_key_values"  # transformers < 5.24; deprecated (with a warning) from 5.24
# Order matters: where a caller passes both names, transformers 5.24 uses ``cache``, and so do we.
CACHE_KWARGS = (NEW_NAME, OLD_NAME)


def library_cache_name() -> str:
    """The name the installed transformers uses, for a forward whose signature names neither (``**kwargs`` only,
    e.g. a wrapper): its causal-LM output class has a ``cache`` field from 5.24 on."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return NEW_NAME if NEW_NAME in fields else OLD_NAME


def cache_kwarg(model: nn.Module) -> str:
    """The cache keyword ``model.forward`` takes: ``cache`` if its signature has it, else ``past_key_values``.

    transformers' ``deprecate_kwarg`` wraps forward with ``functools.wraps``, so the signature is the real one.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without an inspectable signature
        params = {}
    for name in CACHE_KWARGS:
        if name in params:
            return name
    return library_cache_name()


def cache_from_kwargs(kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """``(name, cache)``: the cache in a forward's keyword arguments, under the name the caller used.

    ``generate`` passes ``cache`` from transformers 5.24 on; a caller's own code may still pass ``past_key_values``.
    The name is the first of ``cache``, ``past_key_values`` holding a cache, else the first present with ``None``,
    else ``None`` (no cache keyword at all). Two different caches under both names are refused: the model would
    silently use one of them.
    """
    given = [name for name in CACHE_KWARGS if kwargs.get(name) is not None]
    if len(given) > 1 and kwargs[NEW_NAME] is not kwargs[OLD_NAME]:
        raise ValueError(f"got two caches, as `{NEW_NAME}` and as `{OLD_NAME}`: pass one "
                         f"(`{OLD_NAME}` is the name before transformers 5.24)")
    if given:
        return given[0], kwargs[given[0]]
    present = [name for name in CACHE_KWARGS if name in kwargs]
    return (present[0] if present else None), None


def set_cache(kwargs: dict[str, Any], name: str, cache: Any) -> dict[str, Any]:
    """``kwargs`` with ``cache`` under ``name`` only: the other name is dropped (both at once makes transformers
    5.24 warn and ignore ``past_key_values``)."""
    for other in CACHE_KWARGS:
        if other != name:
            kwargs.pop(other, None)
    kwargs[name] = cache
    return kwargs


def output_cache(output: Any) -> Any:
    """The cache a forward returned: ``output.cache`` where the output class has that field (transformers >= 5.24),
    else ``output.past_key_values``. Reading ``past_key_values`` on a 5.24 output would log a deprecation warning."""
    if dataclasses.is_dataclass(output) and any(f.name == NEW_NAME for f in dataclasses.fields(output)):
        return output.cache
    return getattr(output, OLD_NAME, None)
