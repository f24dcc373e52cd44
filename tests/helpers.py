"""Test helpers shared by several test modules."""
import numpy as np
import torch

from lrnn_analysis.models import lipschitz_matrix


def lipschitz_matrix_np(M, beta, gamma) -> np.ndarray:
    """The models' Lipschitz parameterization applied to numpy arrays (float64, batched)."""
    as_tensor = lambda v: torch.as_tensor(np.asarray(v, dtype=np.float64))  # noqa: E731
    return lipschitz_matrix(as_tensor(M), as_tensor(beta), as_tensor(gamma)).numpy()
