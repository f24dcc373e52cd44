"""Estimators keep the vectors of an operator that multiplies torch tensors on its device: they never
call its numpy matvec, and their numbers equal those of the same matrix behind numpy products."""
import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator

from lrnn_analysis.hessian import (
    block_curvature,
    diagonal,
    eigenvalues,
    frobenius_norm_squared,
    power_iteration,
    spectral_density,
    trace,
)
from lrnn_analysis.hessian._common import CountedMatvec

from .cases import make_op


def run_all(op):
    return {
        "eigen": eigenvalues(op, k=2, which="BE", tol=1e-8).values,
        "power": power_iteration(op, k=1, tol=1e-6, max_iter=30).values,
        "hutchinson": trace(op, "hutchinson", tol=0.0, max_matvecs=12).estimate,
        "hutch++": trace(op, "hutch++", tol=0.0, max_matvecs=24).estimate,
        "xtrace": trace(op, "xtrace", max_matvecs=20).estimate,
        "diag": diagonal(op, "hutchinson", max_matvecs=6).estimate,
        "xdiag": diagonal(op, "xdiag", max_matvecs=20).estimate,
        "frobenius": frobenius_norm_squared(op, tol=0.0, max_matvecs=8).estimate,
        "density": spectral_density(op, n_probes=2, steps=6).moments,
    }


@pytest.fixture(scope="module")
def operator_and_dense():
    op = make_op()
    return op, op.to_dense().numpy()


def test_estimators_never_leave_the_operators_device(operator_and_dense, monkeypatch):
    op, H = operator_and_dense
    dense = run_all(aslinearoperator(H))

    def refuse(x):
        raise AssertionError("a vector was sent through the numpy matvec")

    monkeypatch.setattr(op, "_matvec", refuse)
    native = run_all(op)
    for name, values in dense.items():
        np.testing.assert_allclose(native[name], values, rtol=1e-9, atol=1e-12, err_msg=name)
    table = block_curvature(op, tol=1e-8, trace_matvecs=10)
    assert [row["param"] for row in table.rows] == list(op.names)


def test_counted_matvec_places_vectors():
    op = make_op()
    products = CountedMatvec(op)
    assert products.device == op.device
    v = products.rademacher(np.random.default_rng(0))
    assert v.dtype == torch.float64 and v.device == op.device
    torch.testing.assert_close(products(v), op.apply(v), rtol=0, atol=0)
    host = CountedMatvec(aslinearoperator(np.eye(3)))
    assert host.device == torch.device("cpu") and host(host.vector(np.arange(3.0))).tolist() == [0.0, 1.0, 2.0]
    assert products.count == 1 and host.count == 1
