"""The SDP tiers' solvers: a panic is not a certificate, interrupts propagate, SCS without a time budget."""
import cvxpy as cp
import pytest

from lrnn_analysis.stability import (
    certify,
)

from .cases import scale_systems


class PanicException(BaseException):
    """Stand-in for pyo3's PanicException (matched by class name, like the real one)."""


def test_a_solver_panic_is_not_certified_and_interrupts_propagate(monkeypatch):
    system = scale_systems()[1]

    def panic(self, *args, **kwargs):
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(cp.Problem, "solve", panic)
    result = certify(system, ["ct-lmi"], tiers=["diag-P"], time_budget=5)[0]
    assert not result.holds and "PanicException" in result.attempts[0].reason

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cp.Problem, "solve", interrupt)
    with pytest.raises(KeyboardInterrupt):
        certify(system, ["ct-lmi"], tiers=["diag-P"], time_budget=5)


def test_scs_without_a_time_budget_runs_and_says_so(monkeypatch):
    system = scale_systems()[1]
    result = certify(system, ["ct-lmi"], tiers=["diag-P"], solver="SCS", time_budget=None)[0]
    attempt = result.attempts[0]
    assert result.holds and attempt.solver == "SCS" and "error" not in attempt.reason
    original = cp.Problem.solve

    def scs_fails(self, *args, **kwargs):
        if kwargs.get("solver") == "SCS":
            raise cp.error.SolverError("SCS failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cp.Problem, "solve", scs_fails)
    attempt = certify(system, ["ct-lmi"], tiers=["diag-P"], solver="SCS", time_budget=None)[0].attempts[0]
    assert "fell back to CLARABEL" in attempt.reason
