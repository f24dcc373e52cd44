"""The light name tables the command line parses with are those the library uses."""
from lrnn_analysis.choices import CERTIFICATES, DISCRETIZATIONS, KINDS, MAX_SIZES, PARAMETERIZATION_TESTS, TASK_NAMES


def test_the_light_name_tables_are_those_the_library_uses():
    from lrnn_analysis.builtin_tasks import TASKS
    from lrnn_analysis.constraints import CONSTRAINTS
    from lrnn_analysis.models.config import DISCRETIZATIONS as MODEL_DISCRETIZATIONS
    from lrnn_analysis.models.config import MAX_SIZES as MODEL_MAX_SIZES
    from lrnn_analysis.robustness import KINDS as ROBUSTNESS_KINDS
    from lrnn_analysis.stability import CERTIFICATES as STABILITY_CERTIFICATES
    from lrnn_analysis.stability import NORM_TESTS

    assert tuple(TASKS) == TASK_NAMES and MODEL_DISCRETIZATIONS is DISCRETIZATIONS and MODEL_MAX_SIZES is MAX_SIZES
    assert ROBUSTNESS_KINDS is KINDS and STABILITY_CERTIFICATES is CERTIFICATES
    assert set(PARAMETERIZATION_TESTS) == set(NORM_TESTS) and set(CONSTRAINTS) <= set(CERTIFICATES)
