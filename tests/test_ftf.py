"""The second-order head: Pade square root against an eigendecomposition, gradients, weighting."""
import copy

import pytest
import torch

from models.ftf import SecondOrderHead, masked_batch_norm, weighted_covariance
from models.sqrtm import eigh_sqrtm, pade_sqrtm, spd_inverse


def well_conditioned_covariances(batch: int, dim: int, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(batch, 4 * dim, dim, dtype=dtype)
    return x.transpose(1, 2) @ x / (4 * dim) + 0.1 * torch.eye(dim, dtype=dtype)


def test_pade_matches_eigendecomposition_float64_and_float32():
    a = well_conditioned_covariances(16, 48)
    reference = eigh_sqrtm(a)
    for dtype in (torch.float64, torch.float32):
        root = pade_sqrtm(a.to(dtype)).double()
        error = torch.linalg.matrix_norm(root - reference) / torch.linalg.matrix_norm(reference)
        assert error.max() < 1e-3, (dtype, error.max())


def test_pade_backward_passes_gradcheck_on_symmetric_inputs():
    # Eigenvalues in [1, 2]: the approximant is exact to ~1e-10 there, so the hand-written
    # backward (which treats the scale s as a constant) must match finite differences.
    base = torch.diag_embed(torch.linspace(1, 2, 6, dtype=torch.float64)).expand(2, 6, 6)
    noise = (0.05 * torch.randn(2, 6, 6, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda n: pade_sqrtm(base + n + n.transpose(1, 2)), (noise,))


def test_pade_gradient_matches_eigendecomposition_gradient():
    a = well_conditioned_covariances(4, 48).requires_grad_(True)
    upstream = torch.randn(4, 48, 48, dtype=torch.float64)
    ours, = torch.autograd.grad((pade_sqrtm(a) * upstream).sum(), a)
    reference, = torch.autograd.grad((eigh_sqrtm(a) * upstream).sum(), a)
    reference = (reference + reference.transpose(1, 2)) / 2  # the gradient along symmetric inputs
    error = torch.linalg.matrix_norm(ours - reference) / torch.linalg.matrix_norm(reference)
    assert error.max() < 1e-3, error.max()


def test_pade_root_stays_accurate_when_the_top_eigenvectors_are_orthogonal_to_ones():
    # A power iteration started from ones sees only the small eigenvalue here and would scale
    # the matrix by 1 instead of 10 (this broke a training run in float32).
    basis = torch.randn(8, 48, 3, dtype=torch.float64)
    basis = torch.linalg.qr(basis - basis.mean(dim=1, keepdim=True)).Q  # orthonormal, orthogonal to ones
    a = 9 * basis @ basis.transpose(1, 2) + torch.eye(48, dtype=torch.float64)  # eigenvalues 10 (x3) and 1
    reference = eigh_sqrtm(a)
    root = pade_sqrtm(a.float()).double()
    error = torch.linalg.matrix_norm(root - reference) / torch.linalg.matrix_norm(reference)
    assert error.max() < 1e-3, error.max()


@pytest.mark.parametrize('size', [5, 24, 25, 48, 49])
def test_spd_inverse_matches_lapack_at_every_block_split(size):
    a = well_conditioned_covariances(3, size)
    inverse, info = spd_inverse(a)
    torch.testing.assert_close(inverse, torch.linalg.inv(a), rtol=1e-9, atol=1e-9)
    assert (info == 0).all()


def test_spd_inverse_flags_singular_matrices_instead_of_raising():
    a = torch.eye(30, dtype=torch.float64).repeat(2, 1, 1)
    a[1, -1, -1] = 0  # singular: the factorisation stops at the last pivot
    inverse, info = spd_inverse(a)
    assert info[0] == 0 and info[1] != 0
    torch.testing.assert_close(inverse[0], torch.eye(30, dtype=torch.float64))


def test_pade_root_of_broken_matrices_is_nan_and_leaves_the_others_alone():
    a = well_conditioned_covariances(3, 30)
    a[1, 3, 3] = float('nan')
    a[2] = -a[2]  # negative definite: Q(Z) has no Cholesky factor
    a.requires_grad_(True)
    root = pade_sqrtm(a)
    assert root[1:].isnan().all() and root[0].isfinite().all()
    root.sum().backward()
    assert a.grad[1:].isnan().all() and a.grad[0].isfinite().all()


def test_weighted_covariance_equals_repeated_tokens():
    x = torch.randn(1, 3, 4, dtype=torch.float64)
    weight = torch.tensor([1., 2., 3.], dtype=torch.float64).view(1, 3, 1)
    repeated = torch.cat([x[:, :1], x[:, 1:2], x[:, 1:2], x[:, 2:3], x[:, 2:3], x[:, 2:3]], dim=1)
    torch.testing.assert_close(weighted_covariance(x, weight),
                               weighted_covariance(repeated, torch.ones(1, 6, 1, dtype=torch.float64)))


def test_head_ignores_masked_tokens_and_runs_in_float32_under_autocast():
    head = SecondOrderHead(16, 3, dim=6).eval()
    tokens, size = torch.randn(2, 5, 16), torch.ones(2, 5, 1)
    mask = torch.tensor([1., 1., 1., 0., 0.]).expand(2, -1)
    masked = head(tokens, size, mask)
    removed = head(tokens[:, :3], size[:, :3])
    torch.testing.assert_close(masked, removed, atol=1e-5, rtol=1e-5)
    # in training too: batch statistics from the alive tokens, running statistics alike
    masked_head, removed_head = head.train(), copy.deepcopy(head)
    torch.testing.assert_close(masked_head(tokens, size, mask), removed_head(tokens[:, :3], size[:, :3]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked_head.bn.running_var, removed_head.bn.running_var)
    head.eval()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert head(tokens, size).dtype == torch.float32


@pytest.mark.parametrize('momentum', [0.1, None])
def test_masked_batch_norm_equals_batch_norm_of_the_alive_tokens(momentum):
    bn = torch.nn.BatchNorm1d(6, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    reference = copy.deepcopy(bn)
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    alive = torch.rand(3, 7) < 0.6
    upstream = torch.randn(3, 7, 6, dtype=torch.float64)
    for _ in range(2):  # two steps: running statistics and the batch count accumulate
        out = masked_batch_norm(bn, x, alive)
        expected = reference(x[alive])
        torch.testing.assert_close(out[alive], expected)
        grads = torch.autograd.grad((out[alive] * upstream[alive]).sum(), [x, bn.weight, bn.bias])
        expected_grads = torch.autograd.grad((expected * upstream[alive]).sum(), [x, reference.weight, reference.bias])
        for ours, theirs in zip(grads, expected_grads):
            torch.testing.assert_close(ours, theirs)
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(getattr(bn, name), getattr(reference, name))
    # masked tokens are normalised with the alive statistics instead of being zeroed
    mean, var = x[alive].mean(0), x[alive].var(0, unbiased=False)
    torch.testing.assert_close(out[~alive], (x[~alive] - mean) / (var + bn.eps).sqrt() * bn.weight + bn.bias)
