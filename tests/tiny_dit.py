"""A tiny DiT-like model (packed tokens, one attention block) and its hand-written RAS oracle,
for the tests of the capture, the module and the runtime."""

from __future__ import annotations

import torch
import torch.nn.functional as F



def rope_tables(n: int, d: int):
    pos = torch.arange(n, dtype=torch.float32)
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    f = pos[:, None] * inv[None, :]
    return f.cos(), f.sin()


def rope_inplace(x: torch.Tensor) -> torch.Tensor:
    """RoPE written like diffusers' WanAttnProcessor: into an ``empty_like`` through strided slices."""
    cos, sin = rope_tables(x.shape[-2], x.shape[-1])
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


class TinyDiT(torch.nn.Module):
    """Packed tokens [B, N, C] -> linear embedding -> one multi-head attention block -> linear out.

    ``variant``: ``"rope"`` applies an in-place RoPE (runs on active tokens: must stay exact);
    ``"cumsum_"`` adds an in-place running sum over the token axis (a token-mixing op writing to an
    active tensor: must be rejected); ``"plain"``: neither.
    """

    def __init__(self, variant: str = "plain", c: int = 4, heads: int = 2, head_dim: int = 4):
        super().__init__()
        self.variant, self.heads, self.head_dim = variant, heads, head_dim
        d = heads * head_dim
        self.embed = torch.nn.Linear(c, d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, c)

    def _split(self, t):  # [B, N, H*D] -> [B, H, N, D] (a transposed view, like diffusers)
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def parts(self, hidden_states):
        """(h, q, k, v) at full length, as they enter attention (the oracle's building blocks)."""
        h = self.embed(hidden_states)
        if self.variant == "cumsum_":
            h.cumsum_(1)
        q, k, v = (self._split(t) for t in self.qkv(h).chunk(3, -1))
        if self.variant == "rope":
            q, k = rope_inplace(q), rope_inplace(k)
        return h, q, k, v

    def head(self, h, attn):
        b, _, n, _ = attn.shape
        return self.out(h + attn.transpose(1, 2).reshape(b, n, -1))

    def forward(self, hidden_states):
        h, q, k, v = self.parts(hidden_states)
        return self.head(h, F.scaled_dot_product_attention(q, k, v))


class TinyOracle:
    """Hand-written RAS for ``TinyDiT``: K/V caches at the attention, an output cache at the end.

    Everything before the attention is token-wise, so computing it at full length and taking the
    active rows is the same computation as running it on the active tokens only.
    """

    def __init__(self, model: TinyDiT):
        self.model = model
        self.k = self.v = self.out = None

    def __call__(self, hidden_states, active=None):
        h, q, k, v = self.model.parts(hidden_states)
        b, n = hidden_states.shape[:2]
        if active is None:
            self.k, self.v = k.clone(), v.clone()
            self.out = self.model.head(h, F.scaled_dot_product_attention(q, k, v))
            return self.out.clone()
        rows = active if active.dim() == 2 else active.expand(b, -1)
        mask = torch.zeros(b, n, dtype=torch.bool).scatter_(1, rows, True)
        m4 = mask[:, None, :, None]
        self.k = torch.where(m4, k, self.k)
        self.v = torch.where(m4, v, self.v)
        fresh = self.model.head(h, F.scaled_dot_product_attention(q, self.k, self.v))
        self.out = torch.where(mask[..., None], fresh, self.out)
        return self.out.clone()


def index_schedule(n: int, batch: int, steps: int, seed: int):
    """Dense, then partial active sets of several sizes, shared and per row, with a dense reset."""
    g = torch.Generator().manual_seed(seed)
    out = [None]
    sizes = [1, max(1, n // 3), n, max(1, n // 2), None, max(1, n - 1)]
    for i in range(steps - 1):
        s = sizes[i % len(sizes)]
        if s is None:
            out.append(None)
        elif i % 2:
            out.append(torch.stack([torch.randperm(n, generator=g)[:s] for _ in range(batch)]))
        else:
            out.append(torch.randperm(n, generator=g)[:s])
    return out
