"""The pipelines' settings check every bound once, with the setting's name first in the message."""
import pytest

from lrnn_analysis.choices import MAX_BATCH_SIZE, MAX_LEVELS
from lrnn_analysis.errors import InputError
from lrnn_analysis.pipelines.audit import AuditSettings, Gate
from lrnn_analysis.pipelines.curvature import CurvatureSettings
from lrnn_analysis.pipelines.robustness import RobustnessSettings
from lrnn_analysis.pipelines.stability import StabilitySettings


@pytest.mark.parametrize("make, name", [
    (lambda: CurvatureSettings(batch_size=MAX_BATCH_SIZE + 1), "batch_size"),
    (lambda: CurvatureSettings(batches=0), "batches"),
    (lambda: CurvatureSettings(top_k=True), "top_k"),
    (lambda: CurvatureSettings(operator="kfac"), "operator"),
    (lambda: CurvatureSettings(dtype="float16"), "dtype"),
    (lambda: CurvatureSettings(rnn_twin="always"), "rnn_twin"),
    (lambda: CurvatureSettings(params=[]), "params"),
    (lambda: CurvatureSettings(backend="pyhessian", density=True), "backend"),
    (lambda: RobustnessSettings(grid={}), "grid"),
    (lambda: RobustnessSettings(grid={"gaussian": [0.1] * (MAX_LEVELS + 1)}), "grid.gaussian"),
    (lambda: RobustnessSettings(grid={"gaussian": [0.1, 0.1]}), "grid.gaussian"),
    (lambda: RobustnessSettings(grid={"gaussian": [0.1]}, seeds=0), "seeds"),
    (lambda: RobustnessSettings(grid={"gaussian": [0.1]}, recurrent_only=True, recurrent="M_*"), "recurrent_only"),
    (lambda: StabilitySettings(certificates=("euler-lmi", "nope")), "unknown certificates"),
    (lambda: StabilitySettings(time_budget=0.0), "time_budget"),
    (lambda: AuditSettings(trace_matvecs=0), "trace_matvecs"),
    (lambda: AuditSettings(gates=("min-accuracy=2",)), "bad gate"),
])
def test_out_of_bounds_settings_are_input_errors_naming_the_setting(make, name):
    with pytest.raises(InputError) as error:
        make()
    assert str(error.value).startswith(name) or name in str(error.value)


def test_settings_normalise_what_they_are_given():
    assert RobustnessSettings(grid={"input-noise": [0, 0.1]}, recurrent="M_A, M_W").grid == {"gaussian": (0.0, 0.1)}
    assert RobustnessSettings(grid={"gaussian": [0]}, recurrent="M_A, M_W").recurrent == ("M_A", "M_W")
    assert CurvatureSettings(params=["M_A"]).params == ("M_A",) and CurvatureSettings(estimates=["blocks"]).estimates == ("blocks",)
    gated = AuditSettings(gates=("min-accuracy=0.5",))
    assert gated.gates == (Gate("min-accuracy", "0.5"),) and gated.preset() == "quick"
    assert gated.to_dict()["gates"] == ["min-accuracy=0.5"]


def test_settings_whose_work_would_run_for_days_are_refused(tmp_path):
    from lrnn_analysis.recipes import load_recipe

    with pytest.raises(InputError, match="sample passes"):
        CurvatureSettings(batch_size=100_000, batches=100, density=True, density_probes=1000, density_steps=10_000)
    assert CurvatureSettings(batch_size=128, batches=8, density=True, density_probes=5, density_steps=80).products() > 0
    (tmp_path / "analyses").mkdir()
    recipe = tmp_path / "analyses" / "land.toml"
    (tmp_path / "m.safetensors").write_bytes(b"")  # existence is all validation needs before the work check
    recipe.write_text('name = "land"\nanalysis = "landscape"\ntask = "digits"\noutput = "land"\ncheckpoints = ["m.safetensors"]\n'
                      "[settings]\nbatch_size = 100000\nbatches = 100\nsteps = {linspace = [-1.0, 1.0, 10001]}\n")
    with pytest.raises(InputError, match="landscape points"):
        load_recipe(recipe)


def test_a_hessian_recipe_takes_a_trace_method_among_the_choices(tmp_path):
    from lrnn_analysis.recipes import load_recipe

    (tmp_path / "analyses").mkdir()
    (tmp_path / "m.safetensors").write_bytes(b"")
    recipe = tmp_path / "analyses" / "hess.toml"
    head = 'name = "hess"\nanalysis = "hessian"\ntask = "digits"\noutput = "hess"\ncheckpoints = ["m.safetensors"]\n[settings]\n'
    recipe.write_text(head + 'trace_method = "deflated"\n')
    assert load_recipe(recipe).pipeline_settings().trace_method == "deflated"
    recipe.write_text(head + 'trace_method = "simpson"\n')
    with pytest.raises(InputError, match="trace_method"):
        load_recipe(recipe)
