"""The JSON the toolkit writes is valid JSON: non-finite floats are null."""
import json

import numpy as np
import pytest

from lrnn_analysis.writers import dumps, write_json


def _strict(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_are_written_as_null(tmp_path):
    data = {"nan": float("nan"), "inf": float("inf"), "finite": 0.25, "numpy": [np.float32("nan"), np.float64("-inf"), np.int64(3)],
            "array": np.array([[1.0, np.inf], [np.nan, -2.0]]), "tuple": (1.5, -float("inf")), "nested": {"deep": [[float("nan")]]}}
    expected = {"nan": None, "inf": None, "finite": 0.25, "numpy": [None, None, 3], "array": [[1.0, None], [None, -2.0]],
                "tuple": [1.5, None], "nested": {"deep": [[None]]}}
    assert _strict(dumps(data)) == expected
    path = write_json(tmp_path / "out.json", data)
    assert _strict(path.read_text()) == expected
    assert data["nan"] != data["nan"] and np.isinf(data["array"][0, 1])  # the caller's data are left as they were


def test_allow_nan_false_refuses_instead():
    for value in (float("nan"), np.float32("inf"), np.array([np.nan])):
        with pytest.raises(ValueError):
            dumps({"x": value}, allow_nan=False)
    assert dumps({"x": 1.0}, allow_nan=False, sort_keys=True) == '{"x": 1.0}'
