import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tests.tiny import build_tiny_llava, build_tiny_text_drafter  # noqa: E402


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_drafter(tmp_path_factory):
    return build_tiny_text_drafter(tmp_path_factory.mktemp("tiny-drafter"))
