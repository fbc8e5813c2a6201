"""The paper's network: VGG-like encoder, global pooling, and orientation heads (QCQP/Bingham, quaternion, 6-D,
and a classification over an SO(3) grid).

Shapes: input (B, C, H, W) from ``Preprocess``; encoder features (B, F, h, w); pooled (B, F); head outputs a
unit quaternion (B, 4) in the internal convention (rotations.py) and, for the QCQP and grid heads, A (B, 4, 4) and
its eigenvalues (B, 4), from which uncertainty.py computes the dispersions; the grid head also gives its logits
(B, G) over the G rotations of ``symmetry.so3_grid`` (the buffer ``grid``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry


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
    """Generalised-mean pooling with a learned exponent p (init 6, as in the paper's code), in float32 under any
    autocast (in float16 the clamp's 1e-6 is subnormal and its 6th power 0, whose p-th root has an infinite
    gradient)."""

    def __init__(self, p: float = 6.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x):  # (B, F, h, w) -> (B, F); PReLU outputs can be negative: clamp before pow
        p = self.p.clamp(1.0, 20.0)
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


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


HEAD_OUTPUTS = {"qcqp": 10, "quat": 4, "6d": 6}  # the grid head: one logit per grid rotation
HEADS = (*HEAD_OUTPUTS, "grid")
UNCERTAINTY_HEADS = ("qcqp", "grid")  # heads whose output has 'A' and 'evals' (the dispersions of uncertainty.py)


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
    A64 = A.double() + torch.diag(_SPREAD.to(A.device, non_blocking=True))
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


GRID_MODE_RADIUS = 2.0  # grid spacings: the window of the mode's chordal mean
GRID_MODE_PASSES = 2  # the first window is centred on the most probable grid rotation, the next on the last mean


def _mates_near(grid: torch.Tensor, mates: torch.Tensor | None, centre: torch.Tensor):
    """For every grid rotation its symmetry mate nearest to ``centre`` (B, 4): (|<q, centre>| (B, G), the mates
    (B, G, 4), or None for C1 where they are the grid rotations themselves)."""
    if mates is None:
        return (centre @ grid.T).abs(), None
    dot, best = torch.einsum("gsi,bi->bgs", mates, centre).abs().max(-1)
    return dot, mates[torch.arange(len(grid), device=grid.device), best]


def _scatter(w: torch.Tensor, outer: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """Σ_g w_g q_g q_gᵀ, (B, 4, 4): q the grid (C1: ``outer`` = its (G, 16) products) or the mates (B, G, 4)."""
    if q is None:
        return (w @ outer).reshape(-1, 4, 4)
    return (q * w[..., None]).transpose(1, 2) @ q


def grid_distribution(logits: torch.Tensor, grid: torch.Tensor, group: torch.Tensor,
                      spacing_deg: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid head's distribution p = softmax(logits) over the rotations ``grid`` (G, 4) -> (mode (B, 4),
    A (B, 4, 4), eigenvalues of A ascending (B, 4)), in float64 (cast back to the logits' dtype); not
    differentiable (the loss is on the logits).

    Mode: the most probable grid rotation g*, refined by the probability-weighted chordal mean (top eigenvector of
    Σ p q qᵀ) of the grid rotations within GRID_MODE_RADIUS grid spacings of it, then once more within the same
    radius of that mean (a window centred off the peak biases the mean towards its centre; measured on peaks of
    σ = half a grid step around random rotations at 15°: median error 0.44° against 7.7° for g*, 1.0° with one
    pass of 1.5 spacings). Each grid rotation is replaced by its symmetry mate (``group``, (S, 4)) nearest to the
    window's centre, so a peak across the border of the asymmetric unit stays one mode.

    A = -Σ_g p_g q_g q_gᵀ over the whole grid (mates nearest the mode; the negated scatter matrix, trace -1), so
    uncertainty.dispersions applies as to the QCQP head: a distribution concentrated on one rotation gives
    eigenvalues (-1, 0, 0, 0) (max dispersion -1, trace -3: confident), a uniform one about -1/4 each
    (dispersions about 0: uncertain); several modes far apart lie in between. For a symmetric group the mates
    nearest the mode fill only its cell of SO(3), so a uniform distribution keeps a dispersion (max: D2 -0.49, O
    -0.82, against -0.97 for a peak of σ = half a step): the ranking holds, its range shrinks with the group's
    order."""
    with torch.no_grad():
        p = torch.softmax(logits.double(), dim=1)  # (B, G)
        grid, group = grid.double(), group.double()
        mates = rotations.quat_mul(grid[:, None, :], group) if len(group) > 1 else None  # (G, S, 4)
        cos_r = math.cos(GRID_MODE_RADIUS * math.radians(spacing_deg) / 2)  # geodesic 2 acos|<q, c>| <= radius
        outer = (grid[:, :, None] * grid[:, None, :]).reshape(len(grid), 16) if mates is None else None
        centre = start = grid[p.argmax(1)]  # (B, 4)
        for _ in range(GRID_MODE_PASSES):
            dot, q = _mates_near(grid, mates, centre)
            centre = torch.linalg.eigh(_scatter(p * (dot >= cos_r), outer, q))[1][..., -1]
        mode = centre * torch.where((centre * start).sum(-1, keepdim=True) < 0, -1.0, 1.0)  # the sign of g*
        A = -_scatter(p, outer, None if mates is None else _mates_near(grid, mates, mode)[1])
        evals = torch.linalg.eigvalsh(A)
    return mode.to(logits.dtype), A.to(logits.dtype), evals.to(logits.dtype)


class OrientationNet(nn.Module):
    """Encoder + pooling + dropout + Dense -> head. ``forward`` returns a dict: 'quat' (B, 4) and for the QCQP
    and grid heads 'A' (B, 4, 4) and 'evals' (B, 4, ascending); the grid head also 'logits' (B, G). The head runs
    in float32 even under autocast.

    The grid head (``head='grid'``) classifies over ``symmetry.so3_grid(grid_spacing, sym)`` (G rotations; 4,416
    at 15° for C1): the Dense layer gives G logits; see ``grid_distribution`` for the mode, A and eigenvalues. The
    grid and the group are buffers (``grid``, ``grid_group``), so a checkpoint carries them; the other heads have
    no buffers of their own (their older checkpoints load unchanged)."""

    def __init__(self, in_channels: int, head: str = "qcqp", pooling: str = "gem", width: float = 1.0,
                 drop_last: bool = False, dropout: float = 0.3, qcqp_param: str = "cholesky",
                 grid_spacing: float = 15.0, sym: str = "C1"):
        super().__init__()
        self.qcqp_param = qcqp_param
        if head not in HEADS:
            raise ValueError(f"unknown head '{head}'")
        self.head = head
        n_out = HEAD_OUTPUTS.get(head)
        if head == "grid":
            self.grid_spacing = float(grid_spacing)
            self.register_buffer("grid", torch.as_tensor(symmetry.so3_grid(grid_spacing, sym), dtype=torch.float64))
            self.register_buffer("grid_group", torch.as_tensor(symmetry.group_quats(sym), dtype=torch.float64))
            n_out = len(self.grid)
        self.encoder = Encoder(in_channels, width, drop_last)
        self.pool = Pool(pooling)
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(self.encoder.out_channels * self.pool.factor(), n_out)
        if head == "grid":  # start from the uniform distribution (measured: learns faster than from He's init)
            nn.init.zeros_(self.dense.weight)
        else:
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
            if self.head == "grid":
                quat, A, evals = grid_distribution(out, self.grid, self.grid_group, self.grid_spacing)
                return {"logits": out, "quat": quat, "A": A, "evals": evals}
            if self.head == "quat":
                return {"quat": F.normalize(out, dim=1)}
            return {"quat": matrix_to_quat_torch(gram_schmidt_6d(out))}

    @property
    def has_evals(self) -> bool:
        """Whether ``forward`` gives 'A' and 'evals' (the uncertainty of uncertainty.py)."""
        return self.head in UNCERTAINTY_HEADS

    def l2_penalty(self, head: bool = True) -> torch.Tensor:
        """Keras-style L2: sum of squared conv and dense kernels (multiply by 1e-3 in the loss); ``head`` False
        leaves the dense (head) layer out."""
        return sum((m.weight**2).sum() for m in self.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear)) and (head or m is not self.dense))
