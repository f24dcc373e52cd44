"""Systems with known answers and hand-written checks shared by the stability tests; ground truth
comes from exact rational arithmetic or the schemes' tableaus, never from the certificates' code."""
from fractions import Fraction

import numpy as np

from lrnn_analysis.stability import LureSystem
from lrnn_analysis.stability.forms import _TABLEAUS

MULTISTABLE_A = np.array([[-1.0, 10.0], [0.0, -1.0]])
EULER_A = np.array([[-0.1, 1.0], [-1.0, -0.1]])
U = 2.0**-53
W_SCALE = 2.0**-47  # W = W_SCALE * permutation: ||W||_2 = W_SCALE exactly


def exactly_negative_definite(S):
    """Whether the symmetric float matrix S is negative definite, by exact LDL^T in fractions."""
    n = len(S)
    M = [[-Fraction(float(S[i][j])) for j in range(n)] for i in range(n)]
    for k in range(n):
        if M[k][k] <= 0:
            return False
        for i in range(k + 1, n):
            factor = M[i][k] / M[k][k]
            for j in range(k, n):
                M[i][j] -= factor * M[k][j]
    return True


def stiff_symmetric(seed, top, n=6, largest=2.4e5):
    """Q diag(-largest ... , top) Q^T rounded to float64 and made exactly symmetric."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.concatenate([-np.geomspace(largest, 1.0, n - 1), [top]])
    A = Q @ np.diag(eigenvalues) @ Q.T
    return np.triu(A) + np.triu(A, 1).T


def small_w(n, seed):
    """W_SCALE times a seeded permutation matrix of size n."""
    return W_SCALE * np.eye(n)[np.random.default_rng(seed).permutation(n)]


def scale_systems():
    """A system the norm test certifies, one only an LMI certifies, one whose A + L W is not Hurwitz."""
    rng = np.random.default_rng(7)
    return [
        LureSystem(-np.eye(3) + 0.1 * rng.standard_normal((3, 3)), 0.2 * rng.standard_normal((3, 3))),  # norm test
        LureSystem(np.array([[-1.0, 4.0, 0.0], [0.0, -1.0, 0.5], [0.0, 0.0, -2.0]]), 0.3 * rng.standard_normal((3, 3))),
        LureSystem(np.array([[0.1, 1.0], [-1.0, 0.1]]), 0.1 * np.eye(2)),  # not Hurwitz
    ]


def random_system(rng, n, method, eps, skew=1.5, scale_W=0.9):
    """A = -I + skew (M - M^T) + 0.3 M and W scaled by ``scale_W``, with M standard normal / sqrt(n)."""
    M = rng.standard_normal((n, n)) / np.sqrt(n)
    A = -np.eye(n) + skew * (M - M.T) + 0.3 * M
    W = scale_W * rng.standard_normal((n, n)) / np.sqrt(n)
    return LureSystem(A, W, method=method, eps=eps)


def linear_step(system, D_stages):
    """Per-substep matrix of the scheme for the frozen Jacobians J_i = A + D_i W (one per stage)."""
    n, eps = system.n, system.eps
    if system.method == "map":
        return D_stages[0][:, None] * system.W
    a, b = _TABLEAUS[system.method]
    K = []
    for i in range(len(b)):
        X = np.eye(n) + eps * sum(a[i][j] * K[j] for j in range(i))
        K.append((system.A + D_stages[i][:, None] * system.W) @ X)
    return np.eye(n) + eps * sum(b[i] * K[i] for i in range(len(b)))
