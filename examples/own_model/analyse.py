"""Curvature of the recurrent block and a full audit of the trained MyRNN (after train.py)."""
from pathlib import Path

import torch
from mymodels import MyRNN

import lrnn_analysis as L

task = L.load_data("mydata.npz")
model = MyRNN()
model.load_state_dict(torch.load("my-rnn.pt", weights_only=True))
subject = L.ModelUnderAnalysis.from_module(model, name="my-rnn")  # uses MyRNN's lure_form() and recurrent_parameters

hessian = L.analyze(subject, torch.nn.CrossEntropyLoss(), task.train.batches(128, 1), params=subject.recurrent_names(),
                    progress=False)
print(f"Hessian of the recurrent block {hessian.operator['params']}: lambda_max {hessian.lambda_max:.4g}, "
      f"lambda_min {hessian.lambda_min:.4g}")

audit = L.run_audit(subject, task)
L.write_audit(audit, "my-audit")
report = audit.report
print(f"audit: clean test accuracy {report['clean']['accuracy']:.4f}, lambda_max {report['hessian']['lambda_max']:.4g}")
for c in report["stability"]["certificates"]:
    print(f"certificate {c['name']}: {'holds' if c['holds'] else 'fails'} ({c['reason']})")
print("my-audit/ holds", ", ".join(sorted(p.name for p in Path("my-audit").glob("report.*"))))
