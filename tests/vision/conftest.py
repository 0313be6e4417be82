from __future__ import annotations

import pytest

from tiny_vlm import build


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory):
    """A function: family -> the folder of that family's tiny random model (built once per session)."""
    built = {}

    def get(family: str = "qwen2_vl"):
        if family not in built:
            built[family] = build(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get
