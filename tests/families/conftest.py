"""Tiny models of every family, built once per session and kind of tokenizer."""

from __future__ import annotations

import pytest

from families import tiny

FAMILIES = tuple(tiny.BUILDERS)


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """family_model(family, kind) -> folder of a tiny random model of that family."""
    built = {}

    def get(family: str, kind: str = "sentencepiece"):
        if (family, kind) not in built:
            built[family, kind] = tiny.build(family, tmp_path_factory.mktemp(f"{family}-{kind}") / "model", kind)
        return built[family, kind]
    return get
