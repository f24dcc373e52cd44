"""Accuracy of two toolkit checkpoints under input noise and relative parameter noise, and the figure."""
import lrnn_analysis as L

task = L.load_task("digits")
x, y = task.test.x, task.test.y  # the 359 test digits
grid = {"gaussian": [0.0, 0.1, 0.2], "gaussian-relative": [0.0, 0.05]}  # kind -> levels; level 0 is clean

summary = []
for path in ("models/digits-lipschitz-euler.safetensors", "models/digits-antisymmetric.safetensors"):
    result = L.sweep(L.load_model(path), (x, y), grid, seeds=3)  # the same noise draws at every level
    summary += result.summary
for row in summary:
    print(f"{row['model']:22} {row['perturbation']:18} {row['level']:4}  accuracy {row['accuracy_mean']:.4f}"
          f" +- {row['accuracy_ci95']:.4f}  drop {row['accuracy_drop']:+.4f}")

L.plot_robustness(summary, titles={"gaussian": "Input noise", "gaussian-relative": "Parameter noise"}).savefig(
    "robustness.png")
print("wrote robustness.png")
