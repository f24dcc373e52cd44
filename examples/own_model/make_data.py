"""Writes mydata.npz: rising, falling or flat first channel (classes 0, 1, 2) under noise."""
import numpy as np

rng = np.random.default_rng(0)


def sequences(n):
    """n sequences of 20 steps of 2 channels and their classes."""
    y = rng.integers(0, 3, n)
    trend = np.array([1.0, -1.0, 0.0])[y][:, None] * np.linspace(0, 1, 20)
    x = np.stack([trend + rng.standard_normal((n, 20)), rng.standard_normal((n, 20))], axis=-1)
    return x.astype(np.float32), y


(x_train, y_train), (x_test, y_test) = sequences(600), sequences(300)
np.savez("mydata.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
print("wrote mydata.npz")
