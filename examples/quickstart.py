"""Quickstart: certify a checkpoint, measure its loss curvature, sweep input noise."""
import torch

import lrnn_analysis as L

subject = L.load_model("models/digits-lipschitz-euler.safetensors")  # a committed Lipschitz RNN
task = L.load_task("digits")  # seeded train/val/test splits of 64-step digit sequences
train = task.train.x[:256], task.train.y[:256]  # curvature of the training loss
test = task.test.x, task.test.y  # robustness on the 359 test digits

cert = L.certify_model(subject)  # sound, verified in float64
print(f"certified: {cert.holds} ({cert.source})")
for c in cert.certificates:
    print(f"  {c.name}: " + (f"holds, rate {c.rate:.6f}" if c.holds else f"fails ({c.reason})"))

op = L.HessianOperator(subject, torch.nn.CrossEntropyLoss(), train)
print(f"lambda_max = {L.eigenvalues(op, k=1, which='LA').values[0]:.4g}")
tr = L.trace(op, max_matvecs=40, seed=0)  # Hutchinson, Rademacher probes
print(f"trace = {tr.estimate:.4g} +- {tr.ci_halfwidth:.2g} (95% CI, {tr.matvecs} products)")

result = L.sweep(subject, test, {"gaussian": [0.0, 0.1]}, seeds=3)
for row in result.summary:
    print(f"gaussian input noise {row['level']}: accuracy {row['accuracy_mean']:.4f} +- {row['accuracy_ci95']:.4f}")
