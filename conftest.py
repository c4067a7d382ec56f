# pytest imports this first (the repository root is on sys.path through pyproject's pythonpath).
import socket

import pytest
import torch

# The tests run tiny models: one thread is fastest, and it does not stall when another process
# holds a core (two OpenMP threads on two busy cores can make a step 100x slower).
torch.set_num_threads(1)

LOCAL = ("localhost", "127.0.0.1", "::1", "", None)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test reaches for the network: looking up any host but this machine fails at once (every
    HTTP client looks its host up first), so a test that would download says so instead of waiting."""
    lookup = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in LOCAL and host != socket.gethostname():
            raise socket.gaierror(f"the tests run offline: {host} is not looked up")
        return lookup(host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", local_only)
