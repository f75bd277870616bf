"""One trained run and its bundle, shared by the serving tests."""

from __future__ import annotations

import pytest
from serving_helpers import trained

from tidal.serving import export, load_bundle


@pytest.fixture(scope="session")
def trainer(tmp_path_factory):
    return trained(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="session")
def bundle_dir(trainer):
    return export(trainer.run_dir, trainer.run_dir.parent / "bundle")


@pytest.fixture(scope="session")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)
