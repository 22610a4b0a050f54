"""Central finite differences in float64: the independent reference every backward is checked against."""
import numpy as np


def numerical_grad(f, x, eps=1e-6):
    """d f() / d x by central differences, perturbing ``x`` in place element by element."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return grad


def assert_close(analytic, numeric, rtol=1e-6, atol=1e-8, what=""):
    """Relative error max|a - n| / max(|n|) small, with a floor for tiny gradients."""
    analytic = np.asarray(analytic, dtype=np.float64)
    numeric = np.asarray(numeric, dtype=np.float64)
    assert analytic.shape == numeric.shape, (what, analytic.shape, numeric.shape)
    err = np.abs(analytic - numeric).max() if analytic.size else 0.0
    scale = max(np.abs(numeric).max() if numeric.size else 0.0, 1e-12)
    assert err <= atol + rtol * scale, f"{what}: max abs error {err:.3e} (scale {scale:.3e})"
