"""Session fixtures for the reference model; import them into tests/conftest.py:

    from reference_fixtures import reference_home, reference_env, tiny_reference, tiny_reference_model  # noqa: F401

``reference_home``  a moecompress home for the whole test session, shared by all pytest-xdist workers of the run
                    (so ``tiny`` is trained once per run, not once per worker). With
                    ``MOECOMPRESS_TEST_SHARED_HOME=/some/dir`` it is that directory, kept between runs.
                    It does not touch the environment by itself (conftest's autouse ``_isolated_home`` gives every
                    test a private ``MOECOMPRESS_HOME``).
``reference_env``   function-scoped: points ``MOECOMPRESS_HOME`` at ``reference_home`` for one test (after the
                    autouse isolation), for tests that call ``reference_path("tiny")`` or reuse the task files.
``tiny_reference``  the directory of the built ``tiny`` reference model (built once, under a file lock).
``tiny_reference_model``      ``(model, tokenizer)`` loaded from it, fp32, eval mode. Session-scoped: never modify it in
                    place; ``copy.deepcopy(model)`` first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def reference_home(tmp_path_factory) -> Path:
    keep = os.environ.get("MOECOMPRESS_TEST_SHARED_HOME")
    if keep:
        home = Path(keep)
    else:
        # With xdist, getbasetemp() is per worker; its parent is shared by the workers of this run.
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            root = root.parent
        home = root / "moecompress-reference-home"
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture
def reference_env(reference_home, monkeypatch) -> Path:
    monkeypatch.setenv("MOECOMPRESS_HOME", str(reference_home))
    return reference_home


@pytest.fixture(scope="session")
def tiny_reference(reference_home) -> Path:
    from filelock import FileLock

    from moecompress.reference import build_reference

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOECOMPRESS_HOME", str(reference_home))
        with FileLock(str(reference_home / ".tiny.lock")):
            return build_reference("tiny", progress=False)


@pytest.fixture(scope="session")
def tiny_reference_model(tiny_reference):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_reference, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_reference)
