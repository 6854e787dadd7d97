"""MiniCPM-V's resampler: `query_num` learned queries cross-attend to a slice's vision features, with
2D sin-cos position embeddings of the slice's patch grid added to the keys.

Parameter names are OpenBMB's (`query`, `kv_proj`, `attn.in_proj_weight`, `attn.in_proj_bias`,
`attn.out_proj`, `ln_q`, `ln_kv`, `ln_post`, `proj`), so their weights load unchanged; the attention
is written out (not `nn.MultiheadAttention`) so that LoRA can wrap `attn.out_proj` and `kv_proj`.
"""

import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[n] positions -> [n, dim]: sines then cosines over dim/2 frequencies (base 10000)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """[height * width, dim], row-major; the first half encodes the column, the second the row (MAE's layout)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()


class ResamplerAttention(nn.Module):
    """Multi-head attention with `nn.MultiheadAttention`'s parameter names and sequence-first inputs."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query, key, value, key_padding_mask=None):
        # query [Q, B, D]; key, value [L, B, D]; key_padding_mask [B, L] (True: padding)
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads

        def split(x, w, b):  # [S, B, D] -> [B, heads, S, head_dim]
            x = F.linear(x, w, b)
            return x.view(x.shape[0], x.shape[1], heads, head_dim).permute(1, 2, 0, 3)

        q, k, v = split(query, wq, bq), split(key, wk, bk), split(value, wv, bv)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, Q, head_dim]
        out = out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.embed_dim)
        return self.out_proj(out)  # [Q, B, D]


class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int, eps: float = 1e-6):
        super().__init__()
        self.num_queries, self.embed_dim = num_queries, embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_post = nn.LayerNorm(embed_dim, eps=eps)
        self.proj = nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim))

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        # x [B, L, kv_dim] (padded to the longest slice), tgt_sizes [B, 2] (patch rows, cols) -> [B, Q, D]
        lengths = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).tolist()
        batch, longest = x.shape[0], x.shape[1]
        padding = torch.arange(longest, device=x.device)[None, :] >= torch.tensor(lengths, device=x.device)[:, None]
        pos = torch.zeros(batch, longest, self.embed_dim, device=x.device, dtype=x.dtype)
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            pos[i, : h * w] = sincos_2d(self.embed_dim, h, w).to(x)
        kv = self.ln_kv(self.kv_proj(x)).transpose(0, 1)  # [L, B, D]
        q = self.ln_q(self.query)[:, None, :].expand(-1, batch, -1)  # [Q, B, D]
        out = self.attn(q, kv + pos.transpose(0, 1), kv, key_padding_mask=padding).transpose(0, 1)  # [B, Q, D]
        return self.ln_post(out) @ self.proj
