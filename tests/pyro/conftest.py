import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    """Pyro keeps parameters in a global store; start every test with an empty one and float32."""
    pyro.clear_param_store()
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    pyro.clear_param_store()


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
