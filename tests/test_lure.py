"""LureSystem: bad systems are one-line input errors."""
import numpy as np
import pytest

from lrnn_analysis.stability import (
    LureSystem,
)


def test_bad_systems_are_one_line_input_errors():
    with pytest.raises(ValueError, match="n >= 1"):
        LureSystem(np.zeros((0, 0)), np.zeros((0, 0)))
    for substeps in (float("inf"), float("nan"), 0, 1.5, True):
        with pytest.raises(ValueError, match="substeps"):
            LureSystem(-np.eye(2), np.eye(2), method="euler", eps=0.1, substeps=substeps)
    with pytest.raises(ValueError, match="eps"):
        LureSystem(-np.eye(2), np.eye(2), method="euler", eps=float("inf"))
