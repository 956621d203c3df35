import sys

import pytest

from fedhpc.common.memory import tune_malloc_for_streaming


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_glibc_accepts_the_streaming_malloc_settings() -> None:
    assert tune_malloc_for_streaming() is True
