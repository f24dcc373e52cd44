"""An audit of one checkpoint with gates, written as a report into a temporary directory."""
import tempfile
from pathlib import Path

import lrnn_analysis as L

subject = L.load_model("models/digits-lipschitz-certified.safetensors")
task = L.load_task("digits")
gates = ("certified=euler-lmi", "min-accuracy=0.7", "max-accuracy-drop=gaussian:0.1:0.15")
settings = L.AuditSettings(hessian_batch_size=32, trace_matvecs=20, seeds=2, grid={"gaussian": (0.0, 0.1)}, gates=gates)

audit = L.run_audit(subject, task, settings, label="digits-lipschitz-certified")
for gate in audit.gates:
    print(f"gate {gate.gate}: {'passed' if gate.passed else 'FAILED'} ({gate.detail})")
print("all gates pass" if audit.passed else "a gate failed")

with tempfile.TemporaryDirectory() as tmp:
    out = L.write_audit(audit, Path(tmp) / "audit")
    print("report files:", ", ".join(sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))
