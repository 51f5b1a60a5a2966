"""FID and KID on FID-Inception pool3 features (pytorch-fid / clean-fid compatible numbers).

    params = load_inception_params("pt_inception-2015-12-05-6726825d.pth")
    extract = InceptionFeatures(params)                    # jitted, batched, tqdm progress
    mu_r, sigma_r = cached_stats("ref_stats.npz", lambda: extract(reference_uint8))
    feats = extract(samples_uint8)                         # [N, 2048] float32
    fid = frechet_distance(*feature_stats(feats), mu_r, sigma_r)
    k = kid(feats, reference_features)

All statistics are float64 numpy on the host. `.npz` stats files use pytorch-fid's keys
(`mu`, `sigma`), so its precomputed reference statistics load here and vice versa.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from glide_jax.models.inception import InceptionV3, load_inception_params

__all__ = [
    "frechet_distance",
    "fid_from_features",
    "kid",
    "feature_stats",
    "save_stats",
    "load_stats",
    "cached_stats",
    "InceptionFeatures",
]


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features -> (mean [D], covariance [D, D]), float64; unbiased (N - 1) like np.cov."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # tr sqrt(S1 S2) = sum_i sqrt(eig_i(A S2 A)) with A = S1^{1/2}: A S2 A is similar to S1 S2 and
    # symmetric PSD, so eigh gives real eigenvalues where scipy's sqrtm of the non-symmetric
    # product returns round-off imaginary parts (pytorch-fid discards those). Eigenvalues that
    # round-off pushed below zero are clipped to zero.
    a = _sqrt_psd(sigma1)
    m = a @ sigma2 @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), in float64.

    Same value as pytorch-fid's `calculate_frechet_distance`; the matrix square root's trace
    comes from an eigen-decomposition of the symmetric product S1^{1/2} S2 S1^{1/2}, which
    singular covariances (fewer samples than dimensions) do not upset. Should the decomposition
    still fail or give a non-finite trace, `eps` is added to both diagonals and it is retried,
    as pytorch-fid does for singular products.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} has non-finite entries")
    try:
        tr_covmean = _trace_sqrt_product(s1, s2)
    except np.linalg.LinAlgError:
        tr_covmean = float("nan")
    if not np.isfinite(tr_covmean):
        offset = np.eye(s1.shape[0]) * eps
        tr_covmean = _trace_sqrt_product(s1 + offset, s2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two [N, D] feature sets."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def kid(
    features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3.

    Averaged over `subsets` random subsets of m = min(N1, N2, subset_size) rows drawn without
    replacement from each set (Binkowski et al. 2018; the estimator of StyleGAN2-ADA and
    clean-fid's `kernel_distance`). Float64; ~0 for identical distributions and may be
    slightly negative (the estimator is unbiased).
    """
    x_all = np.asarray(features1, dtype=np.float64)
    y_all = np.asarray(features2, dtype=np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"need features [N1, D] and [N2, D], got {x_all.shape} and {y_all.shape}")
    d = x_all.shape[1]
    m = min(x_all.shape[0], y_all.shape[0], subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
        y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        # Unbiased: diagonal terms k(x_i, x_i) dropped from the within-set means.
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        total += within - 2.0 * kxy.sum() / (m * m)
    return float(total / subsets)


# ----------------------------------------------------------------------------- stats files


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write pytorch-fid-style stats (`mu`, `sigma`) to an .npz file, atomically."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"stats files end in .npz, got {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path[: -len(".npz")] + ".tmp.npz"
    np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu, sigma) float64 from an .npz written by `save_stats` or pytorch-fid."""
    with np.load(os.fspath(path)) as f:
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def cached_stats(path: str | os.PathLike, features_fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Load (mu, sigma) from `path` if it exists; else compute `feature_stats(features_fn())` and save."""
    if os.path.exists(path):
        return load_stats(path)
    mu, sigma = feature_stats(features_fn())
    save_stats(path, mu, sigma)
    return mu, sigma


# ----------------------------------------------------------------------------- features


class InceptionFeatures:
    """Batches images through a jitted FID-Inception forward: uint8 [N, H, W, 3] -> [N, 2048].

    Every batch is padded to `batch_size`, so one compilation serves any N. Inputs are resized
    to 299x299 as pytorch-fid does (see `glide_jax.models.inception.preprocess`).

    Args:
      params: `InceptionV3` params (e.g. from `load_inception_params`).
      batch_size: images per forward pass.
      resize_to: side of the network input (299 for comparable FIDs; None keeps the input size).
      progress: show a tqdm bar.
    """

    def __init__(self, params: Any, batch_size: int = 50, resize_to: int | None = 299, progress: bool = True):

        self.batch_size = batch_size
        self.progress = progress
        model = InceptionV3(resize_to=resize_to, with_logits=False)
        self._params = jax.device_put(params)
        self._forward = jax.jit(lambda p, x: model.apply({"params": p}, x))

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> "InceptionFeatures":
        """From pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`."""
        return cls(load_inception_params(path), **kwargs)

    def _batches(self, images: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
        if isinstance(images, np.ndarray):
            for i in range(0, images.shape[0], self.batch_size):
                yield images[i : i + self.batch_size]
        else:
            for batch in images:  # re-chunk arbitrary batch sizes to `batch_size`
                batch = np.asarray(batch)
                for i in range(0, batch.shape[0], self.batch_size):
                    yield batch[i : i + self.batch_size]

    def __call__(self, images: np.ndarray | Iterable[np.ndarray], desc: str = "inception") -> np.ndarray:
        """Features of all images.

        Args:
          images: uint8 [N, H, W, 3] (or float in [-1, 1]), or an iterable of such batches
            (e.g. a sampler's output, consumed lazily).
        Returns:
          float32 [N, 2048].
        """
        total = images.shape[0] if isinstance(images, np.ndarray) else None
        out, pending = [], None  # fetch batch i-1 while batch i runs
        with tqdm(total=total, desc=desc, unit="img", disable=not self.progress) as bar:
            for batch in self._batches(images):
                n = batch.shape[0]
                if n < self.batch_size:
                    pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
                    batch = np.concatenate([batch, pad])
                result = (self._forward(self._params, batch), n)
                if pending is not None:
                    out.append(np.asarray(pending[0])[: pending[1]])
                    bar.update(pending[1])
                pending = result
            if pending is not None:
                out.append(np.asarray(pending[0])[: pending[1]])
                bar.update(pending[1])
        if not out:
            return np.zeros((0, 2048), np.float32)
        return np.concatenate(out).astype(np.float32)
