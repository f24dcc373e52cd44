"""Every stability test runs with one BLAS/OpenMP thread, as the corner-case tests of the certificates
always did: LAPACK's round-off then does not depend on the machine's thread count."""
import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def _one_thread():
    with threadpool_limits(limits=1):
        yield
