"""Trains MyRNN on mydata.npz your own way and saves its state dict as my-rnn.pt."""
import torch
from mymodels import MyRNN

import lrnn_analysis as L

task = L.load_data("mydata.npz")  # validated: shapes, dtypes, finite values, same T and D in every split
print(task.name, "-", task.description)

torch.manual_seed(0)
model = MyRNN()
optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
for _ in range(20):
    for x, y in task.train.batches(100):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
torch.save(model.state_dict(), "my-rnn.pt")
print("saved my-rnn.pt")
