import pytest


@pytest.fixture(scope="module")
def digits(digits_task):
    """The digits task the sweeps run on."""
    return digits_task
