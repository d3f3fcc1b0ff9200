"""The second-order head: Pade square root against an eigendecomposition, gradients, weighting."""
import torch

from models.ftf import SecondOrderHead, eigh_sqrtm, pade_sqrtm, weighted_covariance


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


def test_pade_gradcheck():
    a = well_conditioned_covariances(2, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(pade_sqrtm, (a,))


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
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert head(tokens, size).dtype == torch.float32
