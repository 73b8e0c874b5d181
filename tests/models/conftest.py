import pytest

from models.data import data_root


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data (or $ATTNSERVE_DATA); tests that need it skip with the reason when it is absent."""
    root = data_root()
    if not (root / "spa-eng" / "spa.txt").exists() or not (root / "fashion-mnist").exists():
        pytest.skip(f"shared datasets not found at {root} (set ATTNSERVE_DATA or place ../shared beside the repo)")
    return root
