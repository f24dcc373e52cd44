"""Certifies MyRNN from a Lur'e form written by hand, at initialisation and after train.py."""
import torch
from mymodels import MyRNN

import lrnn_analysis as L

torch.manual_seed(0)
model = MyRNN()
trained = MyRNN()
trained.load_state_dict(torch.load("my-rnn.pt", weights_only=True))

for label, module in (("initialised", model), ("trained", trained)):
    # h+ = h + eps (A h + tanh(W h + u)) with A = -I, W = rec (column convention: W acts on h).
    system = L.LureSystem(-torch.eye(16), module.rec.detach(), method="euler", eps=module.eps)
    subject = L.ModelUnderAnalysis.from_module(module, name=label, recurrent="rec", lure_form=system)
    result = L.certify_model(subject)
    print(f"{label}: ||W||_2 = {L.spectrum(system).norm_W:.4f}, certified: {result.holds}")
    for c in result.certificates:
        print(f"  {c.name}: " + (f"holds, rate {c.rate:.6f} per step (tier {c.tier})" if c.holds else f"fails ({c.reason})"))
