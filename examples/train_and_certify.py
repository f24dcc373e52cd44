"""Train an unconstrained Lipschitz RNN and a contracting-by-construction model, then certify both."""
import torch

import lrnn_analysis as L
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.training import TrainSettings, train_model

task = L.load_task("digits", seed=0)
for arch in ("lipschitz", "contracting"):
    model = build_model(ModelConfig(arch, task.input_dim, 32, task.output_dim, eps=0.1), seed=0)
    trained = train_model(model, task, TrainSettings(epochs=5), torch.device("cpu"), progress=False)
    system = model.lure_form()  # LureSystem: float64 A, W, method "euler", eps 0.1
    spectra = L.spectrum(system)  # diagnostics, never a certificate
    print(f"{arch}: test accuracy {trained.metrics['test_accuracy']:.4f}, alpha(A) = {spectra.abscissa_A:+.4f}, "
          f"||W||_2 = {spectra.norm_W:.4f}")
    for result in L.certify(system, ["euler-norm", "euler-lmi"], time_budget=30):
        verdict = f"holds, rate {result.rate:.6f} (tier {result.tier})" if result.holds else f"fails: {result.reason}"
        print(f"  {result.name}: {verdict}")

# Every model of a parameterization at once: ||M_A||_2, ||M_W||_2 <= r, here with gamma_W = 0.
for result in L.certify_parameterization(0.75, 0.05, 0.75, 0.0, r=0.0218861, eps=0.03):
    print(f"parameterization {result.test}: {'every model certified' if result.holds else 'not certified'}, "
          f"largest certified radius r* = {result.r_star:.4g}")
