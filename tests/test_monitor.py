"""StabilityMonitor during training, on a toolkit model and on torch RNN/LSTM layers."""
import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.models.torchnn import SequenceClassifier
from lrnn_analysis.monitor import StabilityMonitor
from lrnn_analysis.stability import certify


def _train(model, monitor, epochs=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, 2, generator=gen)
    y = torch.randint(0, 2, (32,), generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(1, epochs + 1):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.update(model, epoch=epoch, train_loss=float(loss.detach()))
    return x, y


def test_monitor_on_a_toolkit_model(tmp_path):
    model = build_model(ModelConfig("lipschitz", 2, 6, 2, eps=0.1), seed=0)
    batch = (torch.randn(16, 8, 2, generator=torch.Generator().manual_seed(5)), torch.randint(0, 2, (16,)))
    monitor = StabilityMonitor("lipschitz", hessian=(nn.functional.cross_entropy, batch), hessian_steps=60, hessian_tol=1e-8)
    _train(model, monitor)
    assert [r["epoch"] for r in monitor.rows] == [1, 2, 3]
    row = monitor.rows[-1]
    system = model.lure_form()
    assert row["norm_W"] == pytest.approx(np.linalg.norm(system.W, 2))
    assert row["euler-norm_holds"] == certify(system, ["euler-norm"])[0].holds
    from lrnn_analysis.hessian import HessianOperator

    exact = np.linalg.eigvalsh(HessianOperator(model, nn.functional.cross_entropy, batch).to_dense())[-1]
    assert row["lambda_max"] == pytest.approx(exact, rel=1e-5, abs=1e-7)
    # warm start: on an unchanged model the previous epoch's vector is (nearly) converged
    warm = StabilityMonitor("lipschitz", hessian=(nn.functional.cross_entropy, batch), hessian_steps=60, hessian_tol=1e-4)
    cold_row, warm_row = warm.update(model, epoch=1)[0], warm.update(model, epoch=2)[0]
    assert warm_row["hessian_matvecs"] < cold_row["hessian_matvecs"]
    assert warm_row["lambda_max"] == pytest.approx(exact, rel=1e-3)
    monitor.update(model, epoch=4)
    from lrnn_analysis import plots

    assert len(plots.plot_training_spectra(monitor.rows, ("norm_W", "lambda_max")).axes) >= 2
    path = monitor.write_csv(tmp_path / "monitor.csv")
    with open(path) as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 4 and float(rows[0]["train_loss"]) == pytest.approx(monitor.rows[0]["train_loss"])


def test_monitor_on_torch_rnn_and_lstm(tmp_path):
    torch.manual_seed(0)
    rnn_model = SequenceClassifier(nn.RNN(2, 5, num_layers=2, batch_first=True), nn.Linear(5, 2))
    monitor = StabilityMonitor("rnn")
    _train(rnn_model, monitor, epochs=2)
    assert [(r["model"], r["layer"]) for r in monitor.rows] == [("rnn layer 0", 0), ("rnn layer 1", 1)] * 2
    systems = rnn_model.lure_forms()
    for row, system in zip(monitor.rows[2:], systems, strict=True):
        assert row["norm_W"] == pytest.approx(np.linalg.norm(system.W, 2))
        assert row["map-norm_holds"] == certify(system, ["map-norm"])[0].holds
    lstm_monitor = StabilityMonitor("lstm", input_bound=3.0)
    _train(SequenceClassifier(nn.LSTM(2, 5), nn.Linear(5, 2)), lstm_monitor, epochs=2)
    assert all("lstm-contraction_holds" in row for row in lstm_monitor.rows)
    from lrnn_analysis import plots

    figure = plots.plot_training_spectra(monitor.rows, ("norm_W", "mu2_W"))
    assert len(figure.axes) >= 2
    assert math.isfinite(monitor.rows[0]["monitor_seconds"])
