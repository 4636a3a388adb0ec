import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets a private MOECOMPRESS_HOME unless it asks for the shared reference one."""
    if "MOECOMPRESS_TEST_SHARED_HOME" not in os.environ:
        monkeypatch.setenv("MOECOMPRESS_HOME", str(tmp_path_factory.mktemp("home")))


from reference_fixtures import reference_env, reference_home, tiny_reference, tiny_reference_model  # noqa: E402,F401
