"""A coupled-oscillator RNN (coRNN, Rusch and Mishra 2021), written as its authors write it, certified
with no Lur'e form written by hand: the toolkit derives the form from the model's step and checks
it against the model before certifying it."""
import torch
from torch import nn

import lrnn_analysis as L


class CoRNN(nn.Module):
    """hz <- hz + dt (tanh(W [x, hz, hy] + b) - gamma hy - epsilon hz), then hy <- hy + dt hz."""

    def __init__(self, inputs=1, hidden=16, classes=10, dt=0.042, gamma=2.7, epsilon=4.7):
        super().__init__()
        self.dt, self.gamma, self.epsilon = dt, gamma, epsilon
        self.i2h = nn.Linear(inputs + 2 * hidden, hidden)
        self.readout = nn.Linear(hidden, classes)
        self.state_shapes = ((hidden,), (hidden,))  # (hy, hz): what the toolkit traces step with
        self.input_shape = (inputs,)

    def step(self, state, x):
        hy, hz = state
        hz = hz + self.dt * (torch.tanh(self.i2h(torch.cat((x, hz, hy), 1))) - self.gamma * hy - self.epsilon * hz)
        hy = hy + self.dt * hz
        return hy, hz

    def forward(self, x):
        hy = hz = x.new_zeros(x.shape[0], self.i2h.out_features)
        for t in range(x.shape[1]):
            hy, hz = self.step((hy, hz), x[:, t])
        return self.readout(hy)


torch.manual_seed(0)
model = CoRNN()
subject = L.ModelUnderAnalysis.from_module(model, name="cornn")
found = L.certify_model(subject, time_budget=30)
print(found.verdict())
for certificate in found.certificates:
    print(f"  {certificate.name}: {'holds' if certificate.holds else 'fails'} ({certificate.reason})")
