"""Optimizers over flat vectors against PyTorch (when installed) and against their formulas."""
import math

import numpy as np
import pytest

from common.optim import OptimConfig, clip_scale, lr_at, make_optimizer, sum_of_squares


def reference_adamw(p, grads, lr, b1, b2, eps, wd, decay_mask):
    """AdamW written straight from the paper's algorithm, one step at a time."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * p * decay_mask
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


def test_adamw_matches_formula():
    rng = np.random.default_rng(0)
    n = 50
    p0 = rng.normal(size=n)
    grads = [rng.normal(size=n) for _ in range(5)]
    mask = np.zeros(n)
    mask[10:30] = 1
    cfg = OptimConfig(optimizer="adamw", lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    opt = make_optimizer(cfg, n, np.float64, decay_ranges=[(10, 30)])
    p = p0.copy()
    for g in grads:
        opt.step(p, g, cfg.lr)
    want = reference_adamw(p0, grads, 0.01, 0.9, 0.95, 1e-8, 0.1, mask)
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adamw"])
def test_matches_pytorch(name):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    n = 64
    p0 = rng.normal(size=n)
    cfg = OptimConfig(optimizer=name, lr=0.05, momentum=0.8, beta1=0.9, beta2=0.99, eps=1e-8,
                      weight_decay=0.1 if name == "adamw" else 0.0)
    opt = make_optimizer(cfg, n, np.float64, decay_ranges=[(0, n)])
    tp = torch.tensor(p0.copy(), requires_grad=True)
    topt = {"sgd": lambda: torch.optim.SGD([tp], lr=cfg.lr),
            "momentum": lambda: torch.optim.SGD([tp], lr=cfg.lr, momentum=cfg.momentum),
            "nesterov": lambda: torch.optim.SGD([tp], lr=cfg.lr, momentum=cfg.momentum, nesterov=True),
            "adamw": lambda: torch.optim.AdamW([tp], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                               eps=cfg.eps, weight_decay=cfg.weight_decay)}[name]()
    p = p0.copy()
    for _ in range(6):
        g = rng.normal(size=n)
        opt.step(p, g, cfg.lr)
        tp.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_grad_scale_equals_scaled_gradient():
    rng = np.random.default_rng(2)
    g = rng.normal(size=20)
    for name in ("sgd", "momentum", "nesterov", "adamw"):
        cfg = OptimConfig(optimizer=name, lr=0.1)
        a, b = rng.normal(size=20), None
        b = a.copy()
        make_optimizer(cfg, 20, np.float64).step(a, g, 0.1, grad_scale=0.25)
        make_optimizer(cfg, 20, np.float64).step(b, g * 0.25, 0.1)
        np.testing.assert_allclose(a, b, rtol=1e-14)


def test_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, lr_decay_steps=110, min_lr=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55)
    assert lr_at(cfg, 110) == pytest.approx(0.1) and lr_at(cfg, 500) == pytest.approx(0.1)
    lrs = [lr_at(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(OptimConfig(lr=0.3), 12345) == 0.3


def test_clip_scale():
    assert clip_scale(0.5, 1.0) == 1.0
    assert clip_scale(4.0, 1.0) == pytest.approx(0.25, rel=1e-5)
    assert clip_scale(4.0, 0.0) == 1.0
    assert clip_scale(float("nan"), 1.0) == 0.0 and clip_scale(math.inf, 0.0) == 0.0
    x = np.arange(5, dtype=np.float32)
    assert sum_of_squares(x) == 30.0


def test_state_roundtrip():
    cfg = OptimConfig(optimizer="adamw", lr=0.01)
    rng = np.random.default_rng(3)
    a = make_optimizer(cfg, 8, np.float64)
    p = rng.normal(size=8)
    a.step(p, rng.normal(size=8), 0.01)
    b = make_optimizer(cfg, 8, np.float64)
    b.load_state_dict({k: (v.copy() if hasattr(v, "copy") else v) for k, v in a.state_dict().items()})
    g = rng.normal(size=8)
    p1, p2 = p.copy(), p.copy()
    a.step(p1, g, 0.01)
    b.step(p2, g, 0.01)
    np.testing.assert_array_equal(p1, p2)


@pytest.mark.parametrize("kwargs, msg", [({"optimizer": "adam"}, "one of"), ({"lr": -1}, "lr"),
                                         ({"beta2": 1.0}, "beta")])
def test_bad_config_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        OptimConfig(**kwargs)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adamw"])
def test_chunked_step_equals_whole_vector_formula(name, threads, monkeypatch):
    """Steps walk the vector in chunks, shared out among threads; with chunks of 7
    elements, decay ranges that cross chunk boundaries and a grad_scale, the result is
    the whole-vector formula's."""
    import common.optim
    monkeypatch.setattr(common.optim, "CHUNK", 7)
    rng = np.random.default_rng(4)
    n = 50
    p0 = rng.normal(size=n)
    mask = np.zeros(n)
    mask[3:12] = mask[20:21] = mask[30:50] = 1
    cfg = OptimConfig(optimizer=name, lr=0.01, momentum=0.9, beta1=0.9, beta2=0.95, eps=1e-8,
                      weight_decay=0.1)
    opt = make_optimizer(cfg, n, np.float64, decay_ranges=[(3, 12), (20, 21), (30, 50)],
                         threads=threads)
    assert sum(len(run) for run in opt._runs) == 8 and len(opt._runs) == threads
    p, grads = p0.copy(), [rng.normal(size=n) for _ in range(4)]
    for g in grads:
        opt.step(p, g, cfg.lr, grad_scale=0.5)
    want, buf = p0.copy(), np.zeros(n)
    if name == "adamw":
        want = reference_adamw(p0, [0.5 * g for g in grads], 0.01, 0.9, 0.95, 1e-8, 0.1, mask)
    else:
        for g in grads:
            want = want - 0.01 * 0.1 * want * mask
            buf = 0.9 * buf + 0.5 * g
            step = {"momentum": buf, "nesterov": 0.5 * g + 0.9 * buf}.get(name, 0.5 * g)
            want = want - 0.01 * step
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-15)


def test_threads_do_not_change_the_result():
    rng = np.random.default_rng(5)
    n = 3 * (1 << 16) + 5                       # several real chunks
    p0, g = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
    cfg = OptimConfig(optimizer="adamw", lr=0.01, weight_decay=0.1)
    out = []
    for threads in (1, 2, 4):
        opt = make_optimizer(cfg, n, np.float32, decay_ranges=[(100, n - 100)], threads=threads)
        p = p0.copy()
        for _ in range(2):
            opt.step(p, g, cfg.lr)
        out.append(p)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    with pytest.raises(ValueError, match="threads"):
        make_optimizer(cfg, n, threads=0)
