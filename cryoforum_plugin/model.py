"""The paper's network: VGG-like encoder, global pooling, and orientation heads (QCQP/Bingham, quaternion, 6-D).

Shapes: input (B, C, H, W) from ``Preprocess``; encoder features (B, F, h, w); pooled (B, F); head outputs a
unit quaternion (B, 4) in the internal convention (geometry.py) and, for the QCQP head, A (B, 4, 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_prelu(cin: int, cout: int, k: int) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")  # He initialisation
    return [conv, nn.BatchNorm2d(cout, momentum=0.01), nn.PReLU(cout)]  # Keras BN momentum 0.99


class Encoder(nn.Module):
    """Supplementary Table 1: 7x7 conv 32, 5x5 conv 64, double-3x3 blocks 128, 256, 512, 1024, each stage followed
    by 2x2 max-pooling. ``width`` scales every channel count; ``drop_last`` removes the 1024 block (the last two
    conv layers) for speed. (B, C, H, W) -> (B, F, H/64, W/64) (H/32 with ``drop_last``)."""

    def __init__(self, in_channels: int, width: float = 1.0, drop_last: bool = False):
        super().__init__()
        ch = lambda c: max(4, int(round(c * width)))  # noqa: E731
        layers: list[nn.Module] = []
        layers += _conv_bn_prelu(in_channels, ch(32), 7) + [nn.MaxPool2d(2)]
        layers += _conv_bn_prelu(ch(32), ch(64), 5) + [nn.MaxPool2d(2)]
        cin = ch(64)
        for c in (128, 256, 512) + (() if drop_last else (1024,)):
            layers += _conv_bn_prelu(cin, ch(c), 3) + _conv_bn_prelu(ch(c), ch(c), 3) + [nn.MaxPool2d(2, ceil_mode=True)]
            cin = ch(c)
        self.net = nn.Sequential(*layers)
        self.out_channels = cin

    def forward(self, x):
        return self.net(x)


class GeM(nn.Module):
    """Generalised-mean pooling with a learned exponent p (init 6, as in the paper's code)."""

    def __init__(self, p: float = 6.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x):  # (B, F, h, w) -> (B, F); PReLU outputs can be negative: clamp before pow
        p = self.p.clamp(1.0, 20.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class Pool(nn.Module):
    """'gem' (default), 'max' or 'maxavg' (concatenated max and average) global pooling."""

    def __init__(self, kind: str):
        super().__init__()
        if kind not in ("gem", "max", "maxavg"):
            raise ValueError(f"unknown pooling '{kind}'")
        self.kind = kind
        self.gem = GeM() if kind == "gem" else None

    def factor(self) -> int:
        return 2 if self.kind == "maxavg" else 1

    def forward(self, x):
        if self.kind == "gem":
            return self.gem(x)
        mx = x.amax(dim=(-2, -1))
        return torch.cat([mx, x.mean(dim=(-2, -1))], 1) if self.kind == "maxavg" else mx


HEAD_OUTPUTS = {"qcqp": 10, "quat": 4, "6d": 6}


def qcqp_matrix(theta: torch.Tensor, param: str = "cholesky") -> torch.Tensor:
    """(B, 10) -> symmetric (B, 4, 4) A. 'cholesky' (the paper): A = L Lᵀ, PSD, with L upper triangular filled by
    the 10 numbers. 'symmetric' (Peretroukhin et al. 2020): the 10 numbers fill A's upper triangle directly.
    Both give the same kind of solution; eigenvectors and dispersions (eigenvalue differences) do not change when
    A is shifted by c·I, so the symmetric form is PSD up to such a shift."""
    b = theta.shape[0]
    rows, cols = torch.triu_indices(4, 4, device=theta.device)
    L = theta.new_zeros(b, 4, 4)
    L[:, rows, cols] = theta
    if param == "symmetric":
        return L + L.transpose(1, 2) - torch.diag_embed(L.diagonal(dim1=1, dim2=2))
    return L @ L.transpose(1, 2)


_SPREAD = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64) * 1e-4


def qcqp_solve(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The QCQP min_q qᵀAq, |q| = 1: eigenvector of the smallest eigenvalue (differentiable, float64 eigh).
    Returns (quaternion (B, 4), eigenvalues ascending (B, 4)).

    eigh's backward divides by eigenvalue gaps, so a degenerate A (a flat Bingham, common at initialisation)
    gives NaN gradients; a fixed diagonal spread of 1e-4·(0, 1, 2, 3) keeps the gaps apart. It moves the
    solution only where A is (nearly) degenerate, i.e. where the prediction is maximally uncertain anyway."""
    A64 = A.double() + torch.diag(_SPREAD.to(A.device))
    evals, evecs = torch.linalg.eigh(A64)
    return evecs[..., 0].to(A.dtype), evals.to(A.dtype)


def gram_schmidt_6d(x: torch.Tensor) -> torch.Tensor:
    """(B, 6) -> rotation matrices (B, 3, 3) by Gram-Schmidt on two 3-vectors (Zhou et al. 2019), rows b1, b2, b3."""
    a1, a2 = x[:, :3], x[:, 3:]
    b1 = F.normalize(a1, dim=1)
    b2 = F.normalize(a2 - (b1 * a2).sum(1, keepdim=True) * b1, dim=1)
    return torch.stack([b1, b2, torch.cross(b1, b2, dim=1)], dim=1)


def matrix_to_quat_torch(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (B, 3, 3) -> quaternions (B, 4) (w, x, y, z), differentiable: the top eigenvector of
    Bar-Itzhack's symmetric 4x4 matrix, whose eigenvalues (1, -1/3, -1/3, -1/3) are well separated."""
    m = R
    K = torch.stack([
        torch.stack([m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2], m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], -1),
        torch.stack([m[:, 2, 1] - m[:, 1, 2], m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2], m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0]], -1),
        torch.stack([m[:, 0, 2] - m[:, 2, 0], m[:, 0, 1] + m[:, 1, 0], m[:, 1, 1] - m[:, 0, 0] - m[:, 2, 2], m[:, 1, 2] + m[:, 2, 1]], -1),
        torch.stack([m[:, 1, 0] - m[:, 0, 1], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1], m[:, 2, 2] - m[:, 0, 0] - m[:, 1, 1]], -1),
    ], dim=1) / 3.0
    _, evecs = torch.linalg.eigh(K.double())
    return evecs[..., -1].to(R.dtype)


class OrientationNet(nn.Module):
    """Encoder + pooling + dropout + Dense -> head. ``forward`` returns a dict: 'quat' (B, 4) and for the QCQP
    head 'A' (B, 4, 4) and 'evals' (B, 4, ascending). The head runs in float32 even under autocast."""

    def __init__(self, in_channels: int, head: str = "qcqp", pooling: str = "gem", width: float = 1.0,
                 drop_last: bool = False, dropout: float = 0.3, qcqp_param: str = "cholesky"):
        super().__init__()
        self.qcqp_param = qcqp_param
        if head not in HEAD_OUTPUTS:
            raise ValueError(f"unknown head '{head}'")
        self.head = head
        self.encoder = Encoder(in_channels, width, drop_last)
        self.pool = Pool(pooling)
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(self.encoder.out_channels * self.pool.factor(), HEAD_OUTPUTS[head])
        nn.init.kaiming_normal_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor) -> dict:
        feats = self.pool(self.encoder(x))
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.dense(self.dropout(feats.float()))
            if self.head == "qcqp":
                A = qcqp_matrix(out, self.qcqp_param)
                quat, evals = qcqp_solve(A)
                return {"quat": quat, "A": A, "evals": evals}
            if self.head == "quat":
                return {"quat": F.normalize(out, dim=1)}
            return {"quat": matrix_to_quat_torch(gram_schmidt_6d(out))}

    def l2_penalty(self, head: bool = True) -> torch.Tensor:
        """Keras-style L2: sum of squared conv and dense kernels (multiply by 1e-3 in the loss); ``head`` False
        leaves the dense (head) layer out."""
        return sum((m.weight**2).sum() for m in self.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear)) and (head or m is not self.dense))
