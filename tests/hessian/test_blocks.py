"""The per-block curvature table against the dense diagonal blocks."""
import json

import numpy as np
import pytest

from lrnn_analysis.hessian import (
    BLOCK_FIELDS,
    block_curvature,
)


def test_block_table_matches_the_dense_diagonal_blocks(case):
    op, H = case
    table = block_curvature(op, tol=1e-8, trace_matvecs=30, seed=0, first=("M_W", "M_A"))
    assert [row["param"] for row in table.rows][:2] == ["M_W", "M_A"]
    assert {row["param"] for row in table.rows} == set(op.names)
    slices = op.block_slices()
    for row in table.rows:
        assert tuple(row) == BLOCK_FIELDS
        block = H[slices[row["param"]], slices[row["param"]]]
        assert row["lambda_max"] == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=1e-6, abs=1e-12)
        assert row["numel"] == block.shape[0]
        if row["trace_method"] == "exact":
            assert row["trace"] == pytest.approx(np.trace(block), rel=1e-10, abs=1e-14)
            assert 0 <= row["trace_ci_halfwidth"] < 1e-9
            # the block's own products give its eigenpair too: no Lanczos products on top
            assert row["matvecs"] == row["numel"] and row["lambda_max_residual"] < 1e-10 and row["lambda_max_converged"]
            assert row["lambda_max"] == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=1e-10, abs=1e-14)
        else:
            assert abs(row["trace"] - np.trace(block)) <= 3 * row["trace_ci_halfwidth"]
    assert {row["trace_method"] for row in table.rows} == {"exact", "hutchinson, shared probes"}
    assert table.shared_matvecs == 30 and table.matvecs == table.shared_matvecs + sum(row["matvecs"] for row in table.rows)
    json.dumps(table.to_dict(), allow_nan=False)


def test_block_lambda_max_starts_warm_from_the_top_eigenvector(case):
    op, H = case
    top = np.linalg.eigh(H)[1][:, -1]
    cold = block_curvature(op, tol=1e-8, trace_matvecs=4, seed=0)
    warm = block_curvature(op, tol=1e-8, trace_matvecs=4, seed=0, start=top)
    slices = op.block_slices()
    for c, w in zip(cold.rows, warm.rows, strict=True):
        block = H[slices[w["param"]], slices[w["param"]]]
        assert w["lambda_max"] == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=1e-6, abs=1e-12) and w["lambda_max_converged"]
        assert (c["param"], c["trace"]) == (w["param"], w["trace"])
    assert cold.rows[0]["trace_method"] != "exact"  # a block with a Lanczos run
    zero_in_a_block = top.copy()
    zero_in_a_block[slices[warm.rows[0]["param"]]] = 0.0  # that block starts cold
    assert block_curvature(op, tol=1e-8, trace_matvecs=4, seed=0, start=zero_in_a_block).rows[0] == cold.rows[0]
    tiny_in_a_block = top.copy()
    tiny_in_a_block[slices[warm.rows[0]["param"]]] *= 1e-170  # not zero: that block still starts warm, from the same direction
    tiny = block_curvature(op, tol=1e-8, trace_matvecs=4, seed=0, start=tiny_in_a_block).rows[0]
    assert tiny["lambda_max"] == pytest.approx(warm.rows[0]["lambda_max"], rel=1e-10) and tiny["matvecs"] == warm.rows[0]["matvecs"]
    with pytest.raises(ValueError, match="one entry per parameter"):
        block_curvature(op, start=np.ones(3))


def test_shared_probe_block_traces_cover_the_exact_block_traces(case):
    """One set of probes serves every block: its products do not grow with the number of blocks, and
    the 95% intervals cover the exact block traces about 95% of the time (checked over 40 seeds)."""
    op, H = case
    slices = op.block_slices()
    sampled = [name for name in op.names if slices[name].stop - slices[name].start > 16]
    assert len(sampled) >= 2
    covered = total = 0
    for seed in range(40):
        table = block_curvature(op, tol=1e-3, trace_matvecs=20, seed=seed)
        assert table.shared_matvecs == 20
        for row in table.rows:
            if row["param"] in sampled:
                exact = np.trace(H[slices[row["param"]], slices[row["param"]]])
                covered += abs(row["trace"] - exact) <= row["trace_ci_halfwidth"]
                total += 1
    assert total == 40 * len(sampled) and covered / total >= 0.85
