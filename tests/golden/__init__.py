"""Golden daemon tests: the real relay, exact replies and exact relayed bytes."""

import pytest

# the scripts' plain asserts get pytest's detailed messages (CPython; PyPy runs --assert=plain)
pytest.register_assert_rewrite("tests.golden.harness", "tests.golden.scenarios")
