"""Control keys in tests: always temporary directories, never the real home or /etc.

`lrk.control.auth.default_key_dir()` honours `$LRK_KEYS`. For the whole session it points
under a regular file, where nothing can be created: a test that would start a relay or a
client on the default keys without saying which fails loudly instead of writing to (or
reading from) ~/.config/lrk/keys or /etc/lrk/keys. Tests that start relays take the
`control_keys_env` fixture (their conftest makes it autouse): `$LRK_KEYS` is then a
session-wide temporary key directory, which the relays they start and the clients they use
both find. It holds one key, `admin.key`, so that every client there may do anything, as
before keys existed (legacy calls included); the ownership rules between keys are tested
with keys of their own (tests/integration/test_security.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from lrk.control.auth import KEYS_ENV, create_key

_made = []


def pytest_configure(config: pytest.Config) -> None:
    base = tempfile.mkdtemp(prefix="lrk-no-keys-")
    _made.append(base)
    blocker = os.path.join(base, "not-a-directory")
    with open(blocker, "w"):
        pass
    os.environ[KEYS_ENV] = os.path.join(blocker, "keys")


def pytest_unconfigure(config: pytest.Config) -> None:
    while _made:
        shutil.rmtree(_made.pop(), ignore_errors=True)


@pytest.fixture(scope="session")
def control_keys(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A key directory for the session: admin.key (mode 0600), the only key, so clients
    and lrkproxy ctl both pick it."""
    directory = str(tmp_path_factory.mktemp("control") / "keys")
    create_key(directory, "admin", admin=True)
    return directory


@pytest.fixture
def control_keys_env(control_keys: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """$LRK_KEYS set to the session's key directory for this test (and what it starts)."""
    monkeypatch.setenv(KEYS_ENV, control_keys)
    return control_keys
