"""Trace estimators (Hutchinson, Hutch++, XTrace) and their confidence intervals against the exact trace."""
import json

import numpy as np
import pytest
from scipy.sparse.linalg import aslinearoperator

from lrnn_analysis.hessian import (
    HessianOperator,
    eigenvalues,
    trace,
)
from lrnn_analysis.hessian.trace import krylov_start


def test_xtrace_is_accurate_and_beats_hutchplusplus_at_equal_budget(case):
    _, H = case
    op, exact = aslinearoperator(H), np.trace(H)
    xt = [trace(op, "xtrace", max_matvecs=40, seed=s) for s in range(30)]
    hpp = [trace(op, "hutch++", tol=0.0, max_matvecs=40, seed=s) for s in range(30)]
    assert all(r.matvecs == 40 and r.sketch_size == 20 and len(r.samples) == 20 for r in xt)
    assert np.mean([(r.estimate - exact) ** 2 for r in xt]) < np.mean([(r.estimate - exact) ** 2 for r in hpp])
    assert np.mean([abs(r.estimate - exact) <= r.ci_halfwidth for r in xt]) >= 0.8
    json.dumps(xt[0].to_dict(), allow_nan=False)


def test_xtrace_is_exact_when_the_rank_is_below_the_probe_count():
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((40, 5)))[0]
    A = U @ np.diag([5.0, 3.0, 2.0, -1.0, 0.5]) @ U.T + 1e-9 * np.eye(40)
    result = trace(aslinearoperator(A), "xtrace", max_matvecs=16, seed=1)
    assert result.estimate == pytest.approx(np.trace(A), rel=1e-6)
    with pytest.raises(ValueError, match="xtrace needs"):
        trace(aslinearoperator(A), "xtrace", max_matvecs=80)
    singular = U @ np.diag([5.0, 3.0, 2.0, -1.0, 0.5]) @ U.T
    with pytest.raises(ValueError, match="rank-deficient"):
        trace(aslinearoperator(singular), "xtrace", max_matvecs=16, seed=1)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_confidence_interval_covers_exact_trace_in_90_percent_of_seeds(ce, method):
    _, H = ce
    op, exact = aslinearoperator(H), np.trace(H)
    results = [trace(op, method=method, tol=0.0, max_matvecs=24, seed=seed) for seed in range(100)]
    covered = [abs(r.estimate - exact) <= r.ci_halfwidth for r in results]
    assert np.mean(covered) >= 0.9
    assert all(r.matvecs == 24 and r.stop_reason == "budget" and not r.converged for r in results)


def test_hutchplusplus_beats_hutchinson_and_tolerance_stops(ce):
    _, H = ce
    op, exact = aslinearoperator(H), np.trace(H)
    plain = [trace(op, "hutchinson", tol=0.0, max_matvecs=60, seed=s) for s in range(20)]
    plus = [trace(op, "hutch++", tol=0.0, max_matvecs=60, seed=s) for s in range(20)]
    assert np.mean([(r.estimate - exact) ** 2 for r in plus]) < np.mean([(r.estimate - exact) ** 2 for r in plain])
    assert plus[0].sketch_size == 20 and plus[0].exact_part != 0
    stopped = trace(ce[0], "hutch++", tol=0.05, max_matvecs=300, seed=0)
    assert stopped.converged and stopped.stop_reason == "tolerance" and stopped.matvecs < 300
    assert stopped.ci_halfwidth <= 0.05 * abs(stopped.estimate)
    json.dumps(stopped.to_dict(), allow_nan=False)


def test_trace_on_a_full_rank_sketch_is_exact_up_to_its_roundoff_bound(ce):
    A = np.diag(np.arange(1.0, 7.0))
    result = trace(aslinearoperator(A), "hutch++", max_matvecs=18, sketch_size=6)
    assert result.estimate == pytest.approx(21.0) and 0 < result.ci_halfwidth < 1e-12
    assert result.stop_reason == "exact" and result.converged and result.matvecs == 12
    op64, H = ce
    op32 = HessianOperator(op64.model, op64.loss_fn, op64.batches[0])
    full = trace(op32, "hutch++", max_matvecs=2 * op32.dim, sketch_size=op32.dim)
    assert full.ci_halfwidth == full.roundoff_bound > 0
    assert abs(full.estimate - np.trace(H)) <= full.ci_halfwidth
    assert full.roundoff_bound < 1e-2 * abs(np.trace(H))


def test_the_trace_deflated_by_an_eigenvalue_runs_krylov_basis_covers_and_is_narrower(ce):
    """The basis of a Lanczos run from the stream [seed, 1] costs no products here; the probes (from seed)
    are hutchinson's: the intervals still cover the exact trace, and are several times narrower."""
    _, H = ce
    op, exact = aslinearoperator(H), np.trace(H)
    deflated, plain = [], []
    for seed in range(100):
        run = eigenvalues(op, which="BE", v0=krylov_start(seed, op.shape[0]), keep_krylov=True)
        deflated.append(trace(op, "deflated", tol=0.0, max_matvecs=24, seed=seed, krylov=run.krylov))
        plain.append(trace(op, "hutchinson", tol=0.0, max_matvecs=24, seed=seed))
    assert np.mean([abs(r.estimate - exact) <= r.ci_halfwidth for r in deflated]) >= 0.9
    assert np.mean([r.ci_halfwidth for r in deflated]) < 0.5 * np.mean([r.ci_halfwidth for r in plain])
    assert deflated[-1].matvecs == 24 and deflated[-1].sketch_size == run.krylov[0].shape[1] > 0
    json.dumps(deflated[0].to_dict(), allow_nan=False)


def test_the_deflated_interval_covers_where_the_basis_spans_the_range_and_only_round_off_is_left():
    """Rank 3 (indefinite) and a rank-6 GGN: the eigenvalue run's basis spans the range, every sample is
    round-off; the half-width's round-off bound keeps the interval covering, still ~1e-13 of the trace."""
    rng = np.random.default_rng(123)
    U = np.linalg.qr(rng.standard_normal((40, 3)))[0]
    J = rng.standard_normal((6, 40))
    for H in (U @ np.diag([10.0, 5.0, -3.0]) @ U.T, J.T @ J):
        op, exact = aslinearoperator(H), np.trace(H)
        results = [trace(op, "deflated", tol=0.0, max_matvecs=12, seed=seed,
                         krylov=eigenvalues(op, which="BE", v0=krylov_start(seed, 40), keep_krylov=True).krylov) for seed in range(40)]
        assert np.mean([abs(r.estimate - exact) <= r.ci_halfwidth for r in results]) >= 0.9
        assert all(0 < r.roundoff_bound <= r.ci_halfwidth <= 1e-11 * abs(exact) for r in results)


def test_the_deflated_trace_builds_its_own_basis_and_is_exact_on_a_spanned_space(ce):
    _, H = ce
    op, exact = aslinearoperator(H), np.trace(H)
    own = [trace(op, "deflated", tol=0.0, max_matvecs=24, seed=seed) for seed in range(100)]
    assert np.mean([abs(r.estimate - exact) <= r.ci_halfwidth for r in own]) >= 0.9
    assert all(r.sketch_size == 8 and r.matvecs == 24 and len(r.samples) == 16 for r in own)
    A = np.diag(np.arange(1.0, 7.0))
    whole = trace(aslinearoperator(A), "deflated", tol=0.0, max_matvecs=12, sketch_size=6)
    assert whole.exact_part == pytest.approx(21.0, rel=1e-14) and np.all(np.abs(whole.samples) < 1e-12)
    assert whole.estimate == pytest.approx(21.0, rel=1e-12)
    with pytest.raises(ValueError, match="krylov must be"):
        trace(op, "deflated", krylov=(np.eye(3), np.eye(3)))
    basis = eigenvalues(op, which="BE", v0=krylov_start(0, op.shape[0]), keep_krylov=True).krylov
    with pytest.raises(ValueError, match="orthonormal columns"):  # 2Q: the estimate would be biased by 12 tr(QᵀHQ)
        trace(op, "deflated", krylov=(2 * basis[0], 2 * basis[1]))
    with pytest.raises(ValueError, match="its own"):
        trace(op, "deflated", krylov=basis, sketch_size=2)
    with pytest.raises(ValueError, match="not 'hutchinson'"):
        trace(op, "hutchinson", krylov=(np.eye(3), np.eye(3)))
    with pytest.raises(ValueError, match="leave products"):
        trace(op, "deflated", max_matvecs=6, sketch_size=6)
