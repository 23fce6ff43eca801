"""Trains the example risk model and writes 1/weights.npz (run once; the weights are committed).

Synthetic card transactions with 16 standardised features; a hidden rule marks fraud (large amounts at
night from new devices, high velocity, risky merchants, foreign cards). A 16-32-16-1 MLP learns it with
plain numpy gradient descent, so the shipped model gives meaningful scores with no framework.
"""

from pathlib import Path

import numpy as np

FEATURES = 16
rng = np.random.default_rng(20261128)


def synthetic_transactions(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    # 0 amount, 1 hour-of-night, 2 device age (low = new), 3 velocity, 4 merchant risk, 5 foreign card
    logit = 1.6 * x[:, 0] + 1.1 * x[:, 1] - 1.3 * x[:, 2] + 1.4 * x[:, 3] + 1.2 * x[:, 4] + 0.8 * x[:, 5]
    logit += 0.9 * x[:, 0] * x[:, 1] - 3.0
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return x, y[:, None]


def train() -> dict[str, np.ndarray]:
    x, y = synthetic_transactions(20000)
    sizes = [FEATURES, 32, 16, 1]
    params = {}
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        params[f"w{i}"] = (rng.standard_normal((a, b)) * np.sqrt(2 / a)).astype(np.float32)
        params[f"b{i}"] = np.zeros(b, np.float32)
    lr = 0.05
    for _ in range(600):
        h0 = np.maximum(x @ params["w0"] + params["b0"], 0)
        h1 = np.maximum(h0 @ params["w1"] + params["b1"], 0)
        p = 1 / (1 + np.exp(-(h1 @ params["w2"] + params["b2"])))
        g = (p - y) / len(x)
        grads = {"w2": h1.T @ g, "b2": g.sum(0)}
        g1 = (g @ params["w2"].T) * (h1 > 0)
        grads.update({"w1": h0.T @ g1, "b1": g1.sum(0)})
        g0 = (g1 @ params["w1"].T) * (h0 > 0)
        grads.update({"w0": x.T @ g0, "b0": g0.sum(0)})
        for k in params:
            params[k] -= lr * 20 * grads[k]
    accuracy = float(((p > 0.5) == (y > 0.5)).mean())
    print(f"training accuracy {accuracy:.3f}, fraud rate {float(y.mean()):.3f}")
    return params


def train_lite() -> dict[str, np.ndarray]:
    """The cheaper variant (examples/models/risk_lite): logistic regression on the same data, ~30x fewer
    multiply-adds; what sheddable traffic gets under sustained backlog (the degradation ladder's step 2)."""
    x, y = synthetic_transactions(20000)
    w, b = np.zeros((FEATURES, 1), np.float32), np.zeros(1, np.float32)
    for _ in range(300):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        g = (p - y) / len(x)
        w -= 2.0 * x.T @ g
        b -= 2.0 * g.sum(0)
    print(f"lite training accuracy {float(((p > 0.5) == (y > 0.5)).mean()):.3f}")
    return {"w": w.astype(np.float32), "b": b.astype(np.float32)}


if __name__ == "__main__":
    np.savez(Path(__file__).parent / "1" / "weights.npz", **train())
    np.savez(Path(__file__).parent.parent / "risk_lite" / "1" / "weights.npz", **train_lite())
