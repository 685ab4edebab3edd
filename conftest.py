"""Loaded by pytest before any test module is imported; the one place the tests learn their device.

``SMALL4_TEST_DEVICE`` picks where the tests run: unset or ``cpu`` runs the Triton kernels on CPU tensors through
the interpreter, ``cuda`` (on a GPU machine) runs them compiled on the GPU. Triton's own library functions
(``tl.sum``...) are decorated when ``triton.language`` is first imported, and anything may import it (torch does,
lazily), so the interpreter switch must be set here, before the first test module loads, not in a test module or a
fixture. Kernel, graph and model-path tests take the ``device`` fixture and build their tensors on it. Tests marked
``cuda`` (real model shapes, graph capture) need a GPU: on CPU they are skipped with the reason printed in the
summary (``-ra``), never silently. (Here and not in tests/conftest.py: the parity tests import their own
``conftest`` module by name, and a second one on the way would shadow it.)"""

import os

if os.environ.get("SMALL4_TEST_DEVICE", "cpu").startswith("cuda"):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("SMALL4_TEST_DEVICE=cuda runs compiled kernels: unset TRITON_INTERPRET")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402 - after the interpreter switch
import torch  # noqa: E402

CUDA_REASON = "needs CUDA (run with SMALL4_TEST_DEVICE=cuda on a GPU machine): real-shape / graph-capture case"


def selected_device() -> torch.device:
    """The device named by ``SMALL4_TEST_DEVICE``; a CUDA request on a machine without one is an error, not a skip."""
    name = os.environ.get("SMALL4_TEST_DEVICE", "cpu")
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"SMALL4_TEST_DEVICE must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("SMALL4_TEST_DEVICE=cuda but torch sees no CUDA device")
    return device


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (real model shapes, graph capture)")
    selected_device()  # fail fast on a bad SMALL4_TEST_DEVICE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if selected_device().type == "cuda":
        return
    skip = pytest.mark.skip(reason=CUDA_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel, graph and model-path tests build their tensors."""
    return selected_device()
