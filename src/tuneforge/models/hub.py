"""The one rule for names that are not local files: when a model or data set name is tried on the Hugging Face hub.

A name that does not exist locally is looked up on the hub only if it looks like a hub id (``org/name``) and the
hub is enabled (``HF_HUB_OFFLINE`` unset). The lookup is one metadata request with a short timeout, so a typo in
a local path (``nosuchdir/mydata``) fails in a second with an error that says both what is missing locally and
what the hub answered, instead of waiting on the network's retries.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from ..errors import TuneforgeError

PROBE_TIMEOUT_S = 10.0

# The hub's repo-id grammar: one namespace and one name of word characters, dots and dashes.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_TRUE = {"1", "on", "yes", "true"}

RepoType = Literal["model", "dataset"]


class HubLookupError(TuneforgeError, FileNotFoundError):
    """A name is neither a local path nor a reachable hub repository; the message says both."""


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` and nothing else: no leading ``.``, ``/`` or ``~``, exactly one slash, no ``..`` or ``--``."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name


def hub_disabled_reason(repo_type: RepoType) -> str | None:
    """Why hub lookups are off (the offline switch that is set), or None when they are on. Read at call time, so a
    switch set after import (tests, notebooks) counts."""
    switches = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE" if repo_type == "model" else "HF_DATASETS_OFFLINE"]
    for switch in switches:
        if os.environ.get(switch, "").strip().lower() in _TRUE:
            return f"{switch} is set"
    return None


def probe_hub(name: str, repo_type: RepoType, what: str) -> Any:
    """The hub's metadata for ``name`` (an object with ``siblings``), or :class:`HubLookupError` saying that
    ``name`` is no local path and what the hub answered."""
    missing = f"{what} {name!r}: no such local file or directory"
    disabled = hub_disabled_reason(repo_type)
    if disabled:
        raise HubLookupError(f"{missing} (not tried as a hub {repo_type} id: {disabled})")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return HfApi().repo_info(name, repo_type=repo_type, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise HubLookupError(f"{missing}, and the hub {repo_type} {name!r} is gated: accept its terms on the hub "
                             "and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise HubLookupError(f"{missing}, and the hub has no {repo_type} {name!r} (or it is private)") from None
    except Exception as e:  # network stacks raise many types (httpx, ssl, OSError); each means "not reachable"
        reason = str(e).splitlines()[0] if str(e) else ""
        raise HubLookupError(f"{missing}, and the hub could not be asked about {name!r}: "
                             f"{type(e).__name__}: {reason}"[:400]) from None


__all__ = ["HubLookupError", "looks_like_hub_id", "hub_disabled_reason", "probe_hub", "PROBE_TIMEOUT_S"]
