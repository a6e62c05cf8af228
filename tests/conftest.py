import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from tests.tiny import SHARED


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    # compresso-ops' own cache (lm-eval's task names, source evaluations): one per test session
    monkeypatch.setenv("COMPRESSO_OPS_CACHE", str(tmp_path_factory.getbasetemp() / "compresso_ops_cache"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded, and CI's two cores are shared with subprocess tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared():
    """The read-only ../shared folder; tests that need it skip cleanly where it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (only developer machines and CI have it)")
    return SHARED
