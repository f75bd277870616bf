"""The public API: everything in __all__ exists, and nothing private leaks into it."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

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


def test_command_line_starts_without_torch_or_numba():
    """The package loads its public names lazily, so `tidal` (which imports tidal.cli,
    and the package with it) is in main() before torch or numba load: a Ctrl-C then
    gets its one line, not a traceback."""
    code = "import sys, tidal.cli; print('torch' in sys.modules, 'numba' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["False", "False"], done.stdout + done.stderr


def test_names_resolve_to_their_modules_and_unknown_ones_raise():
    modules = [importlib.import_module(f"tidal.{name}") for name in ("config", "data", "embedding", "errors", "models")]
    for name in tidal.__all__:
        defining = [module for module in modules if name in vars(module)]
        assert defining, f"no submodule of the public API defines {name}"
        for module in defining:
            assert getattr(tidal, name) is getattr(module, name), f"tidal.{name} is not {module.__name__}.{name}"
        assert name in vars(tidal), f"tidal.{name} is not kept after its first use"
    assert set(tidal.__all__) <= set(dir(tidal))
    with pytest.raises(AttributeError, match=r"^module 'tidal' has no attribute 'no_such_name'$"):
        tidal.no_such_name
    assert not hasattr(tidal, "no_such_name")

    from tidal import EmbeddingTable
    from tidal.embedding import EmbeddingTable as defined

    assert EmbeddingTable is defined
