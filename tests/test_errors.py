"""Bad input is an InputError (one line naming the input), the user's own code failing a
UserCodeError with its exception as cause, and anything else is not an InputError (a bug)."""
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from lrnn_analysis.choices import perturbation_level
from lrnn_analysis.data_files import load_data
from lrnn_analysis.environment import resolve_device
from lrnn_analysis.errors import InputError, UserCodeError
from lrnn_analysis.evaluation import evaluate
from lrnn_analysis.hessian import HessianOperator, trace
from lrnn_analysis.lure import LureSystem
from lrnn_analysis.model_under_analysis import ModelUnderAnalysis
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.parameters import require_parameters
from lrnn_analysis.robustness import SweepModel, sweep
from lrnn_analysis.stability import certify
from lrnn_analysis.stability.evidence import EvidenceCheck, certificate_result
from lrnn_analysis.task import task_from_arrays
from lrnn_analysis.training import TrainSettings
from lrnn_analysis.usermodule import load_user_model

CONFIG = ModelConfig("lipschitz", 2, 4, 3, eps=0.1)

USER_MODULE = textwrap.dedent('''
    import sys
    from torch import nn

    def build():
        return nn.Linear(2, 3)

    def refuses(width=2):
        raise ValueError(f"cannot build width {width}")

    def exits():
        sys.exit(3)
''')


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert text and "\n" not in text, text
    return text


@pytest.fixture
def model():
    return build_model(CONFIG, seed=0)


def _arrays(n=6):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 5, 2)).astype(np.float32), rng.integers(0, 3, n)


def test_checkpoint_loader(tmp_path, model):
    with pytest.raises(CheckpointError) as missing:
        load_checkpoint(tmp_path / "nowhere.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(InputError) as junk:
        load_checkpoint(tmp_path / "junk.pt")
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="integrity check failed") as flipped:
        load_checkpoint(path)
    for caught in (missing, junk, flipped):
        assert isinstance(caught.value, InputError) and str(caught.value).startswith(str(tmp_path))
        _one_line(caught.value)


def test_data_file_loader(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "extra.npz", x_train=x, y_train=y, x_test=x, y_test=y, notes=y)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated")
    np.savez(tmp_path / "scalar.npz", x_train=x, y_train=np.int64(3), x_test=x, y_test=y)
    for name, match in (("extra.npz", r"unknown keys \['notes'\]"), ("junk.npz", "not a readable .npz file"),
                        ("scalar.npz", "y_train: a single number")):
        with pytest.raises(InputError, match=match) as caught:
            load_data(tmp_path / name)
        assert _one_line(caught.value).startswith(str(tmp_path / name))
    with pytest.raises(InputError, match="task adding length must be an integer in"):
        load_task("adding", length=1)


def test_user_module_loader(tmp_path):
    (tmp_path / "mine.py").write_text(USER_MODULE)
    (tmp_path / "crashes.py").write_text("raise OSError('no such device')\n")
    with pytest.raises(UserCodeError, match=r"refuses\(width=5\) raised ValueError: cannot build width 5") as refused:
        load_user_model(f"{tmp_path / 'mine.py'}:refuses", model_args={"width": 5})
    assert isinstance(refused.value.__cause__, ValueError)
    with pytest.raises(UserCodeError, match=r"exits\(\) raised SystemExit: 3") as exited:
        load_user_model(f"{tmp_path / 'mine.py'}:exits")
    assert isinstance(exited.value.__cause__, SystemExit)
    with pytest.raises(UserCodeError, match="running .*crashes.py failed: OSError: no such device") as crashed:
        load_user_model(f"{tmp_path / 'crashes.py'}:build")
    assert isinstance(crashed.value.__cause__, OSError) and "lrnn_user.crashes" not in sys.modules
    with pytest.raises(InputError, match="has no attribute 'missing'"):
        load_user_model(f"{tmp_path / 'mine.py'}:missing")
    for caught in (refused, exited, crashed):
        _one_line(caught.value)


class _Failing(nn.Module):
    def __init__(self, lure_form):
        super().__init__()
        self.linear = nn.Linear(2, 3)
        self._lure_form = lure_form

    def forward(self, x):
        raise IndexError("forward failed")

    def lure_form(self):
        return self._lure_form()


def _raise_key_error():
    raise KeyError("W")


def test_user_module_code_failing_is_a_user_code_error_naming_the_module():
    task = task_from_arrays(*_arrays(), *_arrays(), name="mine")
    subject = ModelUnderAnalysis.from_module(_Failing(_raise_key_error), name="failing")
    with pytest.raises(UserCodeError, match=r"^failing: lure_form\(\) raised KeyError: 'W'$") as raised:
        subject.lure_system()
    assert isinstance(raised.value.__cause__, KeyError)
    with pytest.raises(UserCodeError, match=r"failing: lure_form\(\) returned a list"):
        ModelUnderAnalysis.from_module(_Failing(lambda: [1]), name="failing").lure_system()
    with pytest.raises(UserCodeError, match="forward raised IndexError: forward failed") as forward:
        subject.check_fits(task)
    assert isinstance(forward.value.__cause__, IndexError)
    with pytest.raises(UserCodeError, match="^failing: forward raised IndexError: forward failed$"):
        evaluate(subject.module, task.test.x, task.test.y, name="failing")


@pytest.mark.parametrize("call,match", [
    (lambda m: ModelConfig("gru", 2, 4, 3), "unknown architecture 'gru'"),
    (lambda m: build_model(ModelConfig("lipschitz", 2, 65536, 3)), "parameters"),
    (lambda m: LureSystem(np.ones((2, 3)), np.ones((2, 3))), "must be a square matrix"),
    (lambda m: LureSystem(np.eye(2), np.full((2, 2), np.nan)), "non-finite"),
    (lambda m: load_task("imagenet"), "unknown task 'imagenet'"),
    (lambda m: perturbation_level("gaussian", -1.0), "level must be a finite number >= 0"),
    (lambda m: TrainSettings(epochs=0), "epochs and batch_size must be >= 1"),
    (lambda m: resolve_device("tpu"), "unknown device 'tpu'"),
    (lambda m: require_parameters(m, "nothing*", "model"), "matches none of"),
    (lambda m: certify(m.lure_form(), ["no-such-test"]), "unknown certificate 'no-such-test'"),
    (lambda m: HessianOperator(m, nn.CrossEntropyLoss(), (torch.zeros(2, 5, 2), torch.zeros(2, dtype=torch.long)),
                               dtype="float16"), "dtype must be float32 or float64"),
    (lambda m: trace(HessianOperator(m, nn.CrossEntropyLoss(), (torch.zeros(2, 5, 2), torch.zeros(2, dtype=torch.long))),
                     method="guess"), "method must be one of"),
    (lambda m: m(torch.zeros(2, 5, 7)), r"expects input of shape \(batch, time, 2\)"),
    (lambda m: evaluate(m, torch.zeros(0, 5, 2), torch.zeros(0, dtype=torch.long)), "no samples to evaluate"),
    (lambda m: task_from_arrays(*_arrays(), *_arrays(), num_classes="3"), "num_classes must be an integer"),
    (lambda m: task_from_arrays(torch.zeros(4, 5, 2, dtype=torch.bfloat16), np.arange(4), *_arrays()),
     "x_train: a bfloat16 tensor, which numpy cannot hold"),
    (lambda m: sweep([SweepModel("m", "memory", m)], task_from_arrays(*_arrays(), *_arrays(), name="mine"),
                     {"gaussian": [0.0]}, split="holdout"), "split must be train, val or test"),
    (lambda m: ModelUnderAnalysis(object(), "thing"), "must be a torch.nn.Module"),
])
def test_bad_arguments_of_the_python_api_are_input_errors(model, call, match):
    with pytest.raises(InputError, match=match) as caught:
        call(model)
    _one_line(caught.value)


def test_what_is_not_the_callers_input_is_not_an_input_error(model):
    with pytest.raises(ValueError, match="only verified evidence") as internal:
        certificate_result(EvidenceCheck("failed", "no evidence", 0.0), model)
    assert not isinstance(internal.value, InputError)
    model.forward = lambda x: torch.empty(0).view(3, 7)  # the toolkit's own forward failing: a bug, as it is
    with pytest.raises(RuntimeError) as bug:
        evaluate(model, torch.zeros(2, 5, 2), torch.zeros(2, dtype=torch.long))
    assert not isinstance(bug.value, InputError)
    broken = build_model(CONFIG, seed=0)
    broken.lure_form = lambda: 1 / 0
    with pytest.raises(ZeroDivisionError):
        ModelUnderAnalysis.from_recurrent_model(broken).lure_system()
