"""Certificates of torch.nn recurrent layers: a two-layer nn.RNN (Lur'e maps) and an nn.LSTM (bounded inputs)."""
import torch
from torch import nn

import lrnn_analysis as L
from lrnn_analysis.models import SequenceClassifier
from lrnn_analysis.stability import certify_recurrent, check_lure_form

torch.manual_seed(0)
x = torch.randn(4, 30, 8)  # (batch, time, input)

model = SequenceClassifier(nn.RNN(8, 64, num_layers=2, batch_first=True), nn.Linear(64, 10))
systems = model.lure_forms()  # one LureSystem ("map") per layer
consistency = check_lure_form(model, systems[1], x, layer=1)  # the form reproduces the layer's states?
print(f"layer 1 form: relative state difference {consistency.relative_difference:.1e}, consistent: {consistency.consistent}")
stack = certify_recurrent(model, time_budget=60)[0]  # every layer, then the stack
print(f"nn.RNN stack: holds {stack.holds}, rate {stack.rate:.4f}, coupling gains {[round(g, 3) for g in stack.coupling_gains]}")

lstm = SequenceClassifier(nn.LSTM(8, 64), nn.Linear(64, 10))
with torch.no_grad():
    for p in lstm.rnn.parameters():
        p.mul_(0.1)  # small weights: gates that cannot saturate, so memory fades
for bound in (None, 1.0):
    cascade = certify_recurrent(lstm, input_bound=bound)[0]  # LSTM/GRU: holds only for ||x_t||_inf <= bound
    print(f"nn.LSTM, input bound {bound}: holds {cascade.holds} ({cascade.reason})")

subject = L.ModelUnderAnalysis.from_module(model, name="two-layer nn.RNN")
print("certify_model source:", L.certify_model(subject).source)  # no Lur'e form of the whole model: its layers
