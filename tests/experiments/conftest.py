import pytest


@pytest.fixture(autouse=True)
def _private_gpu_ledger(tmp_path, monkeypatch):
    """Each test's pools keep their ledger of GPU starts (`memory.Ledger`) in its own tmp dir."""
    monkeypatch.setenv("KVDISTILL_GPU_LEDGER", str(tmp_path / "gpu-starts.jsonl"))
