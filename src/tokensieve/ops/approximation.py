"""How badly a few basis tokens reconstruct every token: ridge least squares, in float32."""
from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x at index: x (B, N, D), index (B, k) -> (B, k, D)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def approximation_error(x: torch.Tensor, basis_index: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Residual norm of each token after its ridge reconstruction from the basis tokens.

    With S = x[basis_index] (k x D) per row: W = X S^T (S S^T + eps I)^-1, X_hat = W S, and the error
    of token i is ||x_i - x_hat_i||_2. All maths in float32 whatever the input dtype.

    Args:
        x: (B, N, D) token features.
        basis_index: (B, k) long indices of the basis tokens.
        eps: ridge regulariser, > 0.
    Returns:
        (B, N) float32 errors; basis tokens get ~0.
    """
    if x.dim() != 3 or basis_index.dim() != 2 or basis_index.shape[0] != x.shape[0]:
        raise ValueError(
            f"x must be (B, N, D) and basis_index (B, k); got {tuple(x.shape)} and {tuple(basis_index.shape)}"
        )
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    xf = x.float()
    basis = gather_tokens(xf, basis_index)  # (B, k, D)
    gram = basis @ basis.transpose(1, 2)  # (B, k, k)
    gram = gram + eps * torch.eye(gram.shape[-1], device=x.device)
    # W^T = gram^-1 S X^T  (gram is symmetric)
    weights_t = torch.linalg.solve(gram, basis @ xf.transpose(1, 2))  # (B, k, N)
    reconstruction = weights_t.transpose(1, 2) @ basis  # (B, N, D)
    return (xf - reconstruction).norm(dim=-1)
