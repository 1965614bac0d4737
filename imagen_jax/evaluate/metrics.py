"""Sample-quality metrics as pure NumPy functions (float64 inside).

Every function takes plain arrays, so each row of the evaluation table (generated images and
the calibration rows) goes through exactly the same code.
"""

import numpy as np


def adherence(*, predicted: np.ndarray, prompted: np.ndarray) -> float:
  """Prompt adherence = mean_i [judge(x_i) == c_i], c_i the class named by prompt i."""
  predicted, prompted = np.asarray(predicted), np.asarray(prompted)
  if predicted.shape != prompted.shape:
    raise ValueError(f'predicted {predicted.shape} and prompted {prompted.shape} differ.')
  return float(np.mean(predicted == prompted)) if len(prompted) else float('nan')


def per_class_adherence(
  *, predicted: np.ndarray, prompted: np.ndarray, num_classes: int
) -> list[float]:
  """adherence restricted to the prompts of each class c = 0..num_classes-1 (nan if none)."""
  predicted, prompted = np.asarray(predicted), np.asarray(prompted)
  return [
    adherence(predicted=predicted[prompted == c], prompted=prompted[prompted == c])
    for c in range(num_classes)
  ]


def class_entropy_bits(*, predicted: np.ndarray, num_classes: int) -> float:
  """H = -sum_c p_c log2 p_c of the predicted-class histogram; log2(num_classes) when uniform,
  0 when every sample is judged to be the same class (mode collapse)."""
  counts = np.bincount(np.asarray(predicted), minlength=num_classes).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (eigh)."""
  w, v = np.linalg.eigh(matrix)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to [N, F]
  feature sets (Heusel et al. 2017). Tr((S_a S_b)^(1/2)) is computed as the sum of the square
  roots of the eigenvalues of the PSD matrix S_a^(1/2) S_b S_a^(1/2) (same spectrum)."""
  a = np.asarray(features_a, np.float64)
  b = np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f'frechet_distance needs [N>=2, F] sets, got {a.shape} and {b.shape}.')
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root_a = _sqrt_psd(cov_a)
  cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
  trace_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
  fd = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
  return float(max(fd, 0.0))


def pairwise_distances(x: np.ndarray, y: np.ndarray, *, chunk: int = 1024) -> np.ndarray:
  """D[i, j] = |x_i - y_j|_2 for x [N, F], y [M, F] -> [N, M] (float64)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  y_sq = (y * y).sum(1)
  out = np.empty((len(x), len(y)))
  for start in range(0, len(x), chunk):
    xs = x[start : start + chunk]
    sq = (xs * xs).sum(1)[:, None] + y_sq[None, :] - 2.0 * xs @ y.T
    out[start : start + chunk] = np.sqrt(np.clip(sq, 0.0, None))
  return out


def knn_radii(features: np.ndarray, *, k: int) -> np.ndarray:
  """r_i = distance from x_i to its k-th nearest neighbour among the others, [N]."""
  n = len(features)
  if not 1 <= k < n:
    raise ValueError(f'k-NN radii need 1 <= k < N; got k={k}, N={n}.')
  d = pairwise_distances(features, features)
  np.fill_diagonal(d, np.inf)
  return np.partition(d, k - 1, axis=1)[:, k - 1]


def manifold_coverage(
  *, queries: np.ndarray, support: np.ndarray, support_radii: np.ndarray
) -> float:
  """Fraction of queries q inside the manifold of `support`: exists j, |q - s_j| <= r_j."""
  d = pairwise_distances(queries, support)
  return float(np.mean((d <= np.asarray(support_radii)[None, :]).any(axis=1)))


def precision_recall(*, real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls:
  precision = fraction of fake samples inside the real manifold (union of balls of radius
  r_k(real_j) around each real sample), recall = fraction of real samples inside the fake one.
  """
  precision = manifold_coverage(queries=fake, support=real, support_radii=knn_radii(real, k=k))
  recall = manifold_coverage(queries=real, support=fake, support_radii=knn_radii(fake, k=k))
  return precision, recall


def nearest_distance(*, samples: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """d_i = min_j |x_i - y_j|_2 / sqrt(D): RMS per-value distance of each sample [N, ...] to its
  nearest reference item [M, ...] (same units as the pixels, e.g. [-1, 1])."""
  samples = np.asarray(samples).reshape(len(samples), -1)
  reference = np.asarray(reference).reshape(len(reference), -1)
  d = pairwise_distances(samples, reference).min(axis=1)
  return d / np.sqrt(samples.shape[1])


def border_level(images: np.ndarray, *, width: int) -> float:
  """Mean grey level in [0, 1] ((x + 1) / 2 for x in [-1, 1]) of the `width`-pixel frame of
  images [N, R, R, C]; exactly 0 for the real digits (black border)."""
  images = (np.asarray(images, np.float64) + 1.0) / 2.0
  frame = np.ones(images.shape[1:3], bool)
  frame[width:-width, width:-width] = False
  return float(images[:, frame].mean()) if width > 0 else float('nan')
