"""Curvature of a toolkit checkpoint: Hessian eigenvalues, trace and spectral density, and the GGN."""
import torch

import lrnn_analysis as L

subject = L.load_model("models/digits-lipschitz-euler.safetensors")
task = L.load_task("digits")
batch = (task.train.x[:128], task.train.y[:128])  # one batch of training samples
loss = torch.nn.CrossEntropyLoss()

H = L.HessianOperator(subject, loss, batch)  # all parameters; params="M_A,M_W" for the recurrent block
print(f"Hessian of {H.shape[0]} parameters on {len(batch[0])} training samples")

ends = L.eigenvalues(H, k=2, which="BE")  # Lanczos: the 2 largest and the 2 smallest
for value, residual in zip(ends.values, ends.relative_residuals):
    print(f"  eigenvalue {value:9.4f}  relative residual {residual:.1e}")

tr = L.trace(H, method="hutch++", max_matvecs=30, seed=0)
print(f"trace = {tr.estimate:.4g} +- {tr.ci_halfwidth:.2g} (95% CI, {tr.method}, {tr.matvecs} products)")

density = L.spectral_density(H, n_probes=3, steps=20, seed=0)
print(f"tr(H^2)/P = {density.moments[1]:.4g} +- {density.moment_ci_halfwidths[1]:.2g} (SLQ, {density.n_probes} probes)")
rows = [{"model": "lipschitz", "eigenvalue": t, "density": d} for t, d in zip(density.grid, density.density)]
L.plot_density(rows).figure.savefig("density.png")  # an axes-level plot: it returns the Axes
print("wrote density.png")

G = L.GGNOperator(subject, loss, batch, params="M_A,M_W")  # positive semi-definite: only its top end
print(f"GGN of M_A, M_W: lambda_max = {L.eigenvalues(G, k=1, which='LA').values[0]:.4g}")
