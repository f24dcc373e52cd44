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
        else:
            assert abs(row["trace"] - np.trace(block)) <= 3 * row["trace_ci_halfwidth"]
    assert {row["trace_method"] for row in table.rows} == {"exact", "hutch++"}
    assert table.matvecs == sum(row["matvecs"] for row in table.rows)
    json.dumps(table.to_dict(), allow_nan=False)
