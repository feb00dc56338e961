"""Sample quality of binary-image generators, and the baselines a DTM is compared with.

The measure (``Evaluator``) looks at generated images through a small MLP classifier trained on the data:

* ``fd`` — Fréchet distance between Gaussians fitted to the classifier's hidden-layer features of the samples
  and of the data (the FID recipe with a task-specific network). 0 for the data's own statistics.
* ``coverage`` — how many of the classes receive at least ``COVERAGE_SHARE`` of the samples, by the
  classifier's decision; ``class_tv`` — total-variation distance between the sample and data class shares.
* ``confidence`` — mean of the classifier's top probability: legible samples score high.
* ``patch_tv`` — total-variation distance between the frequencies of the 512 binary 3×3 patches in the samples
  and in the data: local stroke structure, which the classifier's features barely see.
* ``copy_rate`` — fraction of samples identical to a training image; ``nn_hamming`` — mean Hamming distance
  from each sample to its nearest training image; ``unique`` — fraction of distinct samples.

Baselines: independent pixels (``IndependentPixels``), a Bernoulli mixture fitted by EM (``BernoulliMixture``)
and the single-step EBM of the same size (an ``opentsu.dtm.DTM`` with one step, the paper's MEBM).
"""

from __future__ import annotations

import numpy as np

from .dtm import single_blas_thread

__all__ = ["Evaluator", "frechet_distance", "patch_histogram", "IndependentPixels", "BernoulliMixture",
           "COVERAGE_SHARE"]

#: A class counts as covered when at least this share of the samples falls in it.
COVERAGE_SHARE = 0.02


def frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
    """``|μa - μb|² + tr(Σa + Σb - 2 (Σa^½ Σb Σa^½)^½)`` (numpy only, symmetric square roots)."""
    values, vectors = np.linalg.eigh(cov_a)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root @ cov_b @ root)
    trace = np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(middle, 0, None)).sum()
    return float(np.sum((np.asarray(mean_a) - np.asarray(mean_b)) ** 2) + max(trace, 0.0))


def patch_histogram(images, size: int = 3) -> np.ndarray:
    """Frequencies of the ``2**(size²)`` binary ``size``×``size`` patches over every position of (N, H, W) images."""
    images = np.asarray(images).astype(np.int64)
    n, height, width = images.shape
    codes = np.zeros((n, height - size + 1, width - size + 1), dtype=np.int64)
    for bit, (di, dj) in enumerate((di, dj) for di in range(size) for dj in range(size)):
        codes |= images[:, di:di + height - size + 1, dj:dj + width - size + 1] << bit
    counts = np.bincount(codes.reshape(-1), minlength=1 << (size * size)).astype(np.float64)
    return counts / counts.sum()


def _gaussian(features):
    return features.mean(axis=0), np.cov(features, rowvar=False)


class Evaluator:
    """Quality figures of (N, H, W) 0/1 images against ``images`` with ``labels`` (the training data).

    The classifier is a one-hidden-layer ReLU network (``hidden`` units) trained here by full-batch Adam with
    a fixed seed, so every figure is reproducible and independent of library versions.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, hidden: int = 128, epochs: int = 400, seed: int = 0):
        images = np.asarray(images)
        self.image_shape = images.shape[1:]
        self.x = images.reshape(len(images), -1).astype(np.float64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = int(self.labels.max()) + 1
        with single_blas_thread():
            self._fit(hidden, epochs, seed)
        self.reference = _gaussian(self.features(images))
        self.class_share = np.bincount(self.labels, minlength=self.classes) / len(self.labels)
        self.patches = patch_histogram(images)
        self._bits = np.packbits(self.x.astype(np.uint8), axis=1)
        self._known = {row.tobytes() for row in self._bits}

    def _fit(self, hidden, epochs, seed):
        rng = np.random.default_rng(seed)
        x, y = self.x.astype(np.float32), np.eye(self.classes, dtype=np.float32)[self.labels]
        d = x.shape[1]
        params = [rng.normal(0, 1 / np.sqrt(d), (d, hidden)), np.zeros(hidden),
                  rng.normal(0, 1 / np.sqrt(hidden), (hidden, self.classes)), np.zeros(self.classes)]
        params = [p.astype(np.float32) for p in params]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        lr, decay = 0.01, 1e-4
        for step in range(1, epochs + 1):
            w1, b1, w2, b2 = params
            pre = x @ w1 + b1
            act = np.maximum(pre, 0)
            logits = act @ w2 + b2
            prob = np.exp(logits - logits.max(axis=1, keepdims=True))
            prob /= prob.sum(axis=1, keepdims=True)
            g_logits = (prob - y) / len(x)
            g_act = g_logits @ w2.T * (pre > 0)
            grads = [x.T @ g_act + decay * w1, g_act.sum(0), act.T @ g_logits + decay * w2, g_logits.sum(0)]
            for p, g, mm, vv in zip(params, grads, m, v):
                mm *= 0.9
                mm += 0.1 * g
                vv *= 0.999
                vv += 0.001 * g * g
                p -= lr * (mm / (1 - 0.9 ** step)) / (np.sqrt(vv / (1 - 0.999 ** step)) + 1e-8)
        self.params = [p.astype(np.float64) for p in params]
        self.train_accuracy = float((self.probabilities(self.x).argmax(1) == self.labels).mean())

    def _flat(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 2:
            return images.astype(np.float64)
        if images.shape[1:] != self.image_shape:
            raise ValueError(f"images have shape {images.shape[1:]}, the data {self.image_shape}")
        return images.reshape(len(images), -1).astype(np.float64)

    def _images(self, images) -> np.ndarray:
        return self._flat(images).astype(np.uint8).reshape(-1, *self.image_shape)

    def features(self, images) -> np.ndarray:
        """Hidden-layer activations, (N, hidden)."""
        w1, b1, _, _ = self.params
        return np.maximum(self._flat(images) @ w1 + b1, 0)

    def probabilities(self, images) -> np.ndarray:
        _, _, w2, b2 = self.params
        logits = self.features(images) @ w2 + b2
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        return prob / prob.sum(axis=1, keepdims=True)

    def fd(self, images, reference=None) -> float:
        """Feature-space Fréchet distance of ``images`` to the data (or to ``reference`` images)."""
        ref = self.reference if reference is None else _gaussian(self.features(reference))
        return frechet_distance(*_gaussian(self.features(images)), *ref)

    def copies(self, images, known=None) -> np.ndarray:
        """Mask of the images identical to a training image (or to one of ``known`` images)."""
        bits = np.packbits(self._flat(images).astype(np.uint8), axis=1)
        if known is None:
            table = self._known
        else:
            table = {r.tobytes() for r in np.packbits(self._flat(known).astype(np.uint8), axis=1)}
        return np.array([row.tobytes() in table for row in bits], dtype=bool)

    def nearest_hamming(self, images, known=None) -> np.ndarray:
        x = self._flat(images)
        ref = self.x if known is None else self._flat(known)
        out = np.empty(len(x))
        for start in range(0, len(x), 256):
            chunk = x[start:start + 256]
            dist = chunk @ (1 - ref).T + (1 - chunk) @ ref.T
            out[start:start + 256] = dist.min(axis=1)
        return out

    def report(self, images, reference=None) -> dict:
        """All figures for ``images``; with ``reference`` images (e.g. a held-out half of the data), the
        distances and copies are measured against those instead of the training data."""
        images = np.asarray(images)
        if len(images) < 2:
            raise ValueError("need at least two images to measure quality")
        prob = self.probabilities(images)
        share = np.bincount(prob.argmax(axis=1), minlength=self.classes) / len(images)
        unique = len({row.tobytes() for row in np.packbits(self._flat(images).astype(np.uint8), axis=1)})
        return {
            "n": int(len(images)),
            "fd": self.fd(images, reference),
            "coverage": int(np.count_nonzero(share >= COVERAGE_SHARE)),
            "class_tv": float(0.5 * np.abs(share - self.class_share).sum()),
            "confidence": float(prob.max(axis=1).mean()),
            "patch_tv": float(0.5 * np.abs(patch_histogram(self._images(images)) - (
                self.patches if reference is None else patch_histogram(self._images(reference)))).sum()),
            "copy_rate": float(self.copies(images, reference).mean()),
            "nn_hamming": float(self.nearest_hamming(images, reference).mean()),
            "unique": unique / len(images),
            "class_share": [round(float(s), 4) for s in share],
        }


class IndependentPixels:
    """Every pixel an independent Bernoulli variable with the data's mean."""

    def __init__(self, images):
        images = np.asarray(images)
        self.shape = images.shape[1:]
        self.mean = images.reshape(len(images), -1).mean(axis=0)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return (rng.random((n, self.mean.size)) < self.mean).astype(np.uint8).reshape(n, *self.shape)


class BernoulliMixture:
    """A mixture of ``components`` products of Bernoulli pixels, fitted by EM (``iterations`` rounds, a
    Beta(α, α) prior on the pixel probabilities so none reaches 0 or 1)."""

    def __init__(self, images, components: int = 50, iterations: int = 100, seed: int = 0, alpha: float = 0.5):
        images = np.asarray(images)
        self.shape = images.shape[1:]
        x = images.reshape(len(images), -1).astype(np.float64)
        rng = np.random.default_rng(seed)
        resp = rng.dirichlet(np.ones(components), size=len(x))
        for _ in range(iterations):
            weight = resp.sum(axis=0)
            self.weights = (weight + 1) / (weight.sum() + components)  # Dirichlet(2) prior: no empty component
            self.probs = (resp.T @ x + alpha) / (weight[:, None] + 2 * alpha)
            log_lik = x @ np.log(self.probs).T + (1 - x) @ np.log1p(-self.probs).T + np.log(self.weights)
            log_lik -= log_lik.max(axis=1, keepdims=True)
            resp = np.exp(log_lik)
            resp /= resp.sum(axis=1, keepdims=True)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        which = rng.choice(len(self.weights), size=n, p=self.weights)
        return (rng.random((n, self.probs.shape[1])) < self.probs[which]).astype(np.uint8).reshape(n, *self.shape)
