"""The public API: everything in __all__ exists, and nothing private leaks into it."""

from __future__ import annotations

import tidal


def test_all_names_exist_and_are_public():
    assert tidal.__all__ == sorted(tidal.__all__)
    for name in tidal.__all__:
        assert hasattr(tidal, name), name
        assert not name.startswith("_"), name


def test_errors_form_one_tree():
    for name in ("ConfigError", "BatchError", "CheckpointError", "CorruptCheckpointError"):
        assert issubclass(getattr(tidal, name), tidal.TidalError)
    assert issubclass(tidal.CorruptCheckpointError, tidal.CheckpointError)


def test_serving_names_exist_and_are_public():
    import tidal.serving

    assert tidal.serving.__all__ == sorted(tidal.serving.__all__)
    for name in tidal.serving.__all__:
        assert hasattr(tidal.serving, name) and not name.startswith("_"), name
