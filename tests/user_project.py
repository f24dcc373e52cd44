"""A user's own project for the command line: a module file (an nn.RNN and an nn.LSTM variant with
their own parameter names, batch-first input) and its .npz data, which the ``project`` fixture
(conftest.py) writes to a temporary folder and trains briefly."""
import textwrap

import numpy as np
import torch

from lrnn_analysis.usermodule import load_user_model

MODULE_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    from lrnn_analysis.models.torchnn import SequenceClassifier

    CALLS = []


    class LSTMNet(nn.Module):
        """readout(last state of an LSTM); x is (batch, time, inputs)."""

        def __init__(self, inputs, hidden, classes):
            super().__init__()
            self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
            self.readout = nn.Linear(hidden, classes)

        def forward(self, x):
            states, _ = self.lstm(x)
            return self.readout(states[:, -1])


    def build(kind="rnn", hidden=8, classes=3):
        CALLS.append((kind, hidden, classes))
        torch.manual_seed(0)
        if kind == "lstm":
            return LSTMNet(2, hidden, classes)
        return SequenceClassifier(nn.RNN(2, hidden, batch_first=True), nn.Linear(hidden, classes))


    def broken():
        raise RuntimeError("the factory failed on purpose")


    def not_a_module():
        return 3


    NOT_CALLABLE = 5


    def exits():
        raise SystemExit(3)


    class Misbehaving(nn.Module):
        """A linear readout of the last step whose forward or lure_form fails as asked."""

        def __init__(self, failure):
            super().__init__()
            self.failure = failure
            self.readout = nn.Linear(2, 3)

        def forward(self, x):
            if self.failure == "forward":
                raise KeyError("forward failed on purpose")
            return self.readout(x[:, -1])

        def lure_form(self):
            if self.failure == "lure_form":
                raise ZeroDivisionError("lure_form failed on purpose")
            return "not a LureSystem"


    def misbehaving(failure="forward"):
        return Misbehaving(failure)
''')


def sequences(rng, n):
    """Three classes of 10-step, 2-channel sequences: a rising, falling or flat first channel."""
    y = rng.integers(0, 3, n)
    t = np.linspace(0, 1, 10)
    x = np.stack([np.array([1.5, -1.5, 0.0])[y][:, None] * t + 0.7 * rng.standard_normal((n, 10)),
                  rng.standard_normal((n, 10))], axis=-1)
    return x.astype(np.float32), y.astype(np.int64)


def model_spec(project):
    """The --model value of the project's factory."""
    return f"{project / 'mymodels.py'}:build"


def hand_accuracy(project, weights, kind):
    """Accuracy of the trained module on the test split, computed here directly."""
    module = load_user_model(model_spec(project), project / weights, {"kind": kind}).module
    data = np.load(project / "data.npz")
    with torch.no_grad():
        predictions = module(torch.from_numpy(data["x_test"])).argmax(1).numpy()
    return float((predictions == data["y_test"]).mean())
