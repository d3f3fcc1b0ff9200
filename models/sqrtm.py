"""Matrix square root of symmetric positive (semi-)definite matrices by a [5/5] Pade approximant
(Song et al., "Fast differentiable matrix square root", ICLR 2022), with a hand-written backward
pass and a products-only SPD inverse, so forward plus backward cost a fraction of an
eigendecomposition (docs/benchmark.md); `eigh_sqrtm` is the reference. Runs in float32 or better,
also under autocast. Used by the FTF head (ftf.py)."""
import functools
import math
from typing import Tuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .tracing import exporting


def pade_coefficients(m: int = 5, n: int = 5) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Coefficients (p, q) of the [m/n] Pade approximant of sqrt(1 - z) = P(z) / Q(z), q[0] = 1.

    Derived in float64 from the binomial series of (1 - z)^(1/2).
    """
    taylor = np.zeros(m + n + 1)
    taylor[0] = 1.0
    for k in range(1, m + n + 1):
        taylor[k] = taylor[k - 1] * (k - 1.5) / k
    # Q's coefficients q1..qn cancel the series terms of order m+1..m+n in Q(z) * T(z) - P(z).
    system = np.array([[taylor[k - j] if k - j >= 0 else 0.0 for j in range(1, n + 1)]
                       for k in range(m + 1, m + n + 1)])
    q = np.concatenate([[1.0], np.linalg.solve(system, -taylor[m + 1:m + n + 1])])
    p = np.array([sum(q[j] * taylor[k - j] for j in range(0, min(k, n) + 1)) for k in range(m + 1)])
    return tuple(p.tolist()), tuple(q.tolist())


PADE_P, PADE_Q = pade_coefficients(5, 5)  # the [5/5] approximant the root uses


def spectral_scale(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """s = ||A^2||_F^(1/2) / d^(1/4) for symmetric PSD a: [B, d, d]; returns s [B, 1, 1] and A^2.

    ||A^2||_F^(1/2) = (sum of eigenvalues^4)^(1/4) lies in [lmax, d^(1/4) lmax], so
    lmax / d^(1/4) <= s <= lmax whatever the matrix: the eigenvalues of Z = I - A / s lie in
    [1 - d^(1/4), 1) ([-1.63, 1) at d = 48), where the approximant is accurate and Q(Z) is
    well-conditioned. Erring low is what the approximant prefers: it is as exact at z = 1 - w as
    at z = 1 - 1/w, so small eigenvalues gain what large ones lose (root error 1.6e-6 on the
    benchmark matrices, 9.5e-6 with a power-iteration estimate of lmax, 3.6e-3 with the
    Frobenius norm). A power iteration from a fixed start, in comparison, can fall far short
    when the start is nearly orthogonal to the top eigenvector (s = lmax / 13 in training once,
    too far for float32). A^2 is not wasted: it gives Z^2 without another product.
    """
    a2 = a @ a
    scale = torch.linalg.matrix_norm(a2).sqrt() / a.shape[-1] ** 0.25
    return scale.clamp(min=torch.finfo(a.dtype).tiny)[:, None, None], a2


SPD_BASE_SIZE = 24  # below this, LAPACK; above, block elimination with batched products


def spd_inverse(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of symmetric positive definite matrices a: [B, n, n]; also returns Cholesky's info [B].

    Batched LAPACK calls on CPU loop over the matrices on one core and cost far more per FLOP than
    batched products (batch 64 on the project's CPU: Cholesky inverse 1.4 ms at 48 x 48, 0.3 ms
    at 24 x 24, a 24 x 24 product 0.02 ms), so larger matrices are split as [[A, B^T], [B, C]]:
    with W = B A^-1 and the Schur complement S = C - W B^T (SPD, so no pivoting is needed), the
    inverse is [[A^-1 + W^T S^-1 W, -(S^-1 W)^T], [-S^-1 W, S^-1]].
    """
    n = a.shape[-1]
    if n <= SPD_BASE_SIZE:
        factor, info = torch.linalg.cholesky_ex(a)
        # A failed factorisation leaves a partial factor that cholesky_inverse may reject with an
        # exception; callers mask those matrices by `info`, so the identity stands in for them.
        failed = (info != 0)[:, None, None]
        factor = torch.where(failed, torch.eye(n, dtype=a.dtype, device=a.device), factor)
        return torch.cholesky_inverse(factor), info
    h = n // 2
    top_inv, top_info = spd_inverse(a[:, :h, :h])
    w = a[:, h:, :h] @ top_inv                                           # [B, n-h, h]
    schur_inv, schur_info = spd_inverse(torch.baddbmm(a[:, h:, h:], w, a[:, h:, :h].transpose(1, 2), alpha=-1))
    lower = schur_inv @ w                                                # S^-1 W: [B, n-h, h]
    out = torch.empty_like(a)
    out[:, :h, :h] = torch.baddbmm(top_inv, w.transpose(1, 2), lower)  # in place would loop: top_inv is column-major
    out[:, h:, :h] = -lower
    out[:, :h, h:] = out[:, h:, :h].transpose(1, 2)
    out[:, h:, h:] = schur_inv
    return out, torch.maximum(top_info, schur_info)


def spd_inverse_flops(n: int) -> int:
    """Matrix-product FLOPs (multiply-adds) of spd_inverse on one n x n matrix; LAPACK not counted."""
    if n <= SPD_BASE_SIZE:
        return 0
    h, m = n // 2, n - n // 2
    return 2 * m * h * h + 2 * m * m * h + spd_inverse_flops(h) + spd_inverse_flops(m)


def pade_sqrtm_flops(d: int) -> int:
    """Matrix-product FLOPs of pade_sqrtm on one d x d matrix: A^2, Z^3, two fused products, Q^-1 P."""
    return 5 * d ** 3 + spd_inverse_flops(d)


def newton_schulz_inverse(a: torch.Tensor, lower: float, upper: float, tol: float = 1e-7) -> torch.Tensor:
    """Inverse of symmetric matrices a: [B, n, n] whose eigenvalues lie in [lower, upper] (> 0),
    with matrix products only (the exported model's path: ONNX has no factorisation).

    Newton-Schulz, X <- 2X - X A X from X = 2 / (lower + upper) I: the residual I - A X starts
    at most rho = (upper - lower) / (upper + lower) in norm and squares every step, so
    ceil(log2(log(tol) / log(rho))) steps reach tol (14 for the root's denominator at d = 48).
    """
    rho = (upper - lower) / (upper + lower)
    steps = max(1, math.ceil(math.log2(math.log(tol) / math.log(rho))))
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    x = (eye * (2.0 / (lower + upper))).expand_as(a)
    for _ in range(steps):
        x = 2 * x - x @ a @ x
    return x


@functools.lru_cache(maxsize=None)
def denominator_bounds(d: int) -> Tuple[float, float]:
    """Bounds on the eigenvalues of Qn(Z) = Q(Z) / q2 for d x d matrices: Q over the interval
    [1 - d^(1/4), 1] where spectral_scale puts the eigenvalues of Z, with a 10% margin."""
    z = np.linspace(1.0 - d ** 0.25, 1.0, 100001)
    values = np.polyval(np.asarray(PADE_Q)[::-1], z) / PADE_Q[2]
    return float(values.min()) * 0.9, float(values.max()) * 1.1


def _quadratic(z: torch.Tensor, z2: torch.Tensor, c0: float, c1: float, eye: torch.Tensor) -> torch.Tensor:
    """Z^2 + c1 Z + c0 I for a batch of matrices z, z2 = z @ z: [B, d, d]; eye: I [d, d]."""
    # NOTE adding c0 I whole (not in place on the diagonal view) gives the same numbers and keeps
    # the graph functional, which torch.export needs.
    return torch.add(z2, z, alpha=c1) + eye * c0


def _pade_forward(a: torch.Tensor):
    """sqrt(A) = sqrt(s) * Q(Z)^-1 P(Z), Z = I - A / s, for a: [B, d, d], [5/5] approximant.

    Returns the root and what the backward pass reuses. P and Q are evaluated in
    Paterson-Stockmeyer form, P = p2 * [L_p(Z) + (p5 / p2) Z^3 H_p(Z)] with monic quadratics
    L_p, H_p (same for Q): four matrix products, the last two fused with their addition. The
    constant p2 / q2 moves into the final scale, so the code works with Pn = P / p2, Qn = Q / q2.
    """
    p, q = PADE_P, PADE_Q
    scale, a2 = spectral_scale(a)  # [B, 1, 1], [B, d, d]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    z = torch.addcmul(eye, a, -scale.reciprocal())  # I - A / s
    z2 = (torch.addcmul(z, a2, scale.pow(-2)) + z) - eye  # (I - A / s)^2 = 2 Z + A^2 / s^2 - I
    z3 = z2 @ z
    numerator = torch.baddbmm(_quadratic(z, z2, p[0] / p[2], p[1] / p[2], eye),
                              z3, _quadratic(z, z2, p[3] / p[5], p[4] / p[5], eye), alpha=p[5] / p[2])
    denominator = torch.baddbmm(_quadratic(z, z2, q[0] / q[2], q[1] / q[2], eye),
                                z3, _quadratic(z, z2, q[3] / q[5], q[4] / q[5], eye), alpha=q[5] / q[2])
    # Q's roots lie beyond z = 1 (the poles of a Pade approximant of a Stieltjes function sit on
    # its branch cut [1, inf)), so Q(Z) is symmetric positive definite whenever A is PSD.
    gain = scale.sqrt() * (p[2] / q[2])  # [B, 1, 1]
    if exporting():
        denominator_inv = newton_schulz_inverse(denominator, *denominator_bounds(a.shape[-1]))
    else:
        denominator_inv, info = spd_inverse(denominator)
        # A failed factorisation (NaN or an indefinite input) must not pass for a number; the
        # gain also scales the backward pass, so the gradient of such a matrix is NaN as well.
        gain = gain.masked_fill((info != 0)[:, None, None], float('nan'))
    ratio = denominator_inv @ numerator  # [B, d, d], symmetric: Qn^-1 and Pn commute
    return ratio * gain, (z, z2, z3, ratio, denominator_inv, scale, gain)


class _PadeSqrtm(torch.autograd.Function):
    """Pade square root with a hand-written backward pass: eight matrix products, no solve.

    Autograd through the forward would differentiate the scale and run a second solve. Here s
    is a constant: sqrt(s) R(I - A / s) equals sqrt(A) up to the approximation error whatever s
    is, so its derivative in s is of the order of that error (1e-6 on well-conditioned matrices).
    With R = Qn^-1 Pn, G the symmetrised upstream gradient times the gain (the code applies the
    constant factors at the end), and
    T_k = sum_{j<k} Z^j G Z^(k-1-j), the chain rule through Qn^-1 Pn and the powers of Z gives
    dL/dZ = Qn^-1 (sum_k pn_k T_k - (sum_k qn_k T_k) R^T), because Qn^-1 and R commute with Z.
    T_{a+b} = Z^a T_b + T_a Z^b with every T symmetric: T_2 = Y + Y^T for Y = Z G (one
    product), likewise T_4 from Z^2 T_2, and T_3, T_5 take two products each.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        root, saved = _pade_forward(a)
        ctx.save_for_backward(*saved)
        return root

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_root: torch.Tensor):
        # backward() may be called inside an autocast region; this pass stays in float32.
        with torch.autocast(device_type=grad_root.device.type, enabled=False):
            return _PadeSqrtm._backward(grad_root, *ctx.saved_tensors)

    @staticmethod
    def _backward(grad_root, z, z2, z3, ratio, denominator_inv, scale, gain):
        p, q = PADE_P, PADE_Q
        # A and its root are symmetric: only the symmetric part of the upstream gradient counts.
        # G is taken as grad + grad^T; the factor 0.5 * gain is applied once, at the end.
        g = grad_root + grad_root.transpose(1, 2)                 # T_1 = G: [B, d, d]
        # sum_k pn_k T_k and sum_k qn_k T_k, accumulated while each T_k is still in cache.
        grad_p, grad_q = g * (p[1] / p[2]), g * (q[1] / q[2])

        def accumulate(term: torch.Tensor, k: int) -> torch.Tensor:
            grad_p.add_(term, alpha=p[k] / p[2])
            grad_q.add_(term, alpha=q[k] / q[2])
            return term
        half = z @ g
        t2 = accumulate(half + half.transpose(1, 2), 2)               # Z G + G Z
        t3 = accumulate((g @ z2).baddbmm_(z, t2), 3)                  # Z T_2 + G Z^2
        half = z2 @ t2
        accumulate(half + half.transpose(1, 2), 4)                    # Z^2 T_2 + T_2 Z^2
        accumulate((t2 @ z3).baddbmm_(z2, t3), 5)                     # Z^2 T_3 + T_2 Z^3
        grad_z = denominator_inv @ grad_p.baddbmm_(grad_q, ratio.transpose(1, 2), alpha=-1)
        # dL/dA = -dL/dZ / s, symmetrised; with G's factor 0.5 * gain: -0.25 * gain / s.
        return torch.add(grad_z, grad_z.transpose(1, 2)).mul_(gain * (-0.25 / scale))


def pade_sqrtm(a: torch.Tensor) -> torch.Tensor:
    """Square root of symmetric positive semi-definite matrices, a: [B, d, d].

    sqrt(A) = sqrt(s) * Q(Z)^-1 P(Z) with Z = I - A / s and the [5/5] Pade approximant P / Q of
    sqrt(1 - z); s (spectral_scale) keeps the eigenvalues of Z where the approximant is
    accurate. Accuracy drops for rank-deficient matrices, whose zero eigenvalues sit at z = 1
    (see docs/benchmark.md). Matrices that are not PSD (or hold NaN) give NaN, value and gradient.
    """
    if torch.is_grad_enabled() and a.requires_grad:
        return _PadeSqrtm.apply(a)
    return _pade_forward(a)[0]  # inference and FLOP counting see plain tensor operations


def eigh_sqrtm(a: torch.Tensor) -> torch.Tensor:
    """Reference square root by eigendecomposition (tests and benchmarks), a: [B, d, d]."""
    values, vectors = torch.linalg.eigh(a)
    return (vectors * values.clamp(min=0).sqrt()[:, None, :]) @ vectors.transpose(-1, -2)
