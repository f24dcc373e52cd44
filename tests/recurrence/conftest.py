"""Fixtures of the engine's tests: one intra-op thread, and counted calls of a NumPy function."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """torch with one intra-op thread (the condition of the engine's NumPy paths); the count the test
    started with, whatever it set meanwhile, is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def counted(monkeypatch):
    """counted(namespace, name): a list that grows by one at each later call of namespace.name, which still runs."""
    def count(namespace, name):
        calls: list[int] = []
        original = getattr(namespace, name)
        monkeypatch.setattr(namespace, name, lambda *a, **k: calls.append(1) or original(*a, **k))
        return calls
    return count
