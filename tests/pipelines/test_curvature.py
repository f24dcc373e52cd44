"""The curvature pipeline's warm starts: one start vector (or None) per model."""
import numpy as np
import pytest

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.model_under_analysis import ModelUnderAnalysis
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.pipelines.curvature import CurvatureSettings, run


def test_each_model_starts_from_its_own_vector_and_a_miscount_is_refused():
    task = load_task("digits", seed=0)
    subjects = [ModelUnderAnalysis.from_recurrent_model(
        build_model(ModelConfig("lipschitz", task.input_dim, 3, task.output_dim, eps=0.1), seed=seed), {}) for seed in (0, 1)]
    settings = CurvatureSettings(batch_size=16, batches=1, dtype="float64")
    cold = run(subjects, task, settings)
    starts = [cold.models[0].report.eigen.vectors[:, 0], None]
    warm = run(subjects, task, settings, starts=starts)
    for c, w in zip(cold.models, warm.models):
        assert w.report.lambda_max == pytest.approx(c.report.lambda_max, rel=1e-3)
    assert [any("started warm" in note for note in m.report.notes) for m in warm.models] == [True, False]
    with pytest.raises(ValueError, match="one start vector"):
        run(subjects, task, settings, starts=[np.ones(3)])
