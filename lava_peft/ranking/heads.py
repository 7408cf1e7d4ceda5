"""The trainable parts of the ranking adapter: prompts, fusion, score head, pair heads.

Notation: ``B`` images, ``P`` image tokens, ``T`` text tokens, width ``d``, ``H`` heads,
``Q`` ranking queries, ``dh = d / H``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LavaConfigError

__all__ = [
    "CrossAttentionBlock",
    "MeanDifferencePairHead",
    "PromptTokens",
    "RankingPairAttention",
    "TextConditionedFusion",
    "mlp_head",
    "pair_index",
]


class PromptTokens(nn.Module):
    """``n`` learnable tokens prepended to the text tokens.

    ``mode="scalar"`` (the reference code): one learnable value per token, broadcast over
    the width (parameter ``[n]``); ``mode="vector"``: a full ``[n, d]`` per-token vector.
    """

    def __init__(self, n: int, width: int, mode: str = "vector"):
        super().__init__()
        if mode not in ("scalar", "vector"):
            raise LavaConfigError(f"prompt mode must be 'scalar' or 'vector'; got {mode!r}")
        self.n, self.width, self.mode = n, width, mode
        shape = (n,) if mode == "scalar" else (n, width)
        self.tokens = nn.Parameter(torch.randn(shape) * 0.02)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, d], [B, T] -> [B, n+T, d], [B, n+T]`` (prompts first, never masked)."""
        tok = self.tokens[:, None].expand(self.n, self.width) if self.mode == "scalar" else self.tokens
        tok = tok.to(text.dtype).unsqueeze(0).expand(text.shape[0], -1, -1)
        ones = torch.ones(text.shape[0], self.n, dtype=torch.bool, device=mask.device)
        return torch.cat([tok, text], 1), torch.cat([ones, mask], 1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: ``x += MHA(LN(x), text, text)``; ``x += FFN(LN(x))`` (image tokens query text)."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(text)
        attn, _ = self.attn(self.norm_q(x), kv, kv, key_padding_mask=~text_mask, need_weights=False)
        x = x + self.drop(attn)
        return x + self.drop(self.ffn(self.norm_ffn(x)))


class TextConditionedFusion(nn.Module):
    """``cross_layers`` cross-attention blocks (image → text), then a ``self_layers`` TransformerEncoder.

    Output: text-conditioned image tokens ``z' [B, P, d]``.
    """

    def __init__(self, width: int, heads: int = 8, cross_layers: int = 2, self_layers: int = 2,
                 ffn: int | None = None, dropout: float = 0.1):
        super().__init__()
        ffn = ffn or width
        self.cross = nn.ModuleList(CrossAttentionBlock(width, heads, ffn, dropout) for _ in range(cross_layers))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=ffn, dropout=dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, self_layers, enable_nested_tensor=False) if self_layers else None

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        x = image
        for block in self.cross:
            x = block(x, text, text_mask)
        return self.encoder(x) if self.encoder is not None else x


def mlp_head(width: int, blocks: int, out: int = 1) -> nn.Sequential:
    """``blocks × (Linear–LayerNorm–ReLU)`` then ``Linear(width, out)``; Xavier-uniform weights, zero biases."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    layers.append(nn.Linear(width, out))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def pair_index(n: int, k: int | None = None, generator: torch.Generator | None = None,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered pairs ``(i, j)``: all ``n²`` (self-pairs included, as in the reference), or,
    with ``k``, ``k`` partners ``j ≠ i`` drawn uniformly (with replacement) for every ``i``."""
    if k is None:
        i, j = torch.meshgrid(torch.arange(n, device=device), torch.arange(n, device=device), indexing="ij")
        return i.reshape(-1), j.reshape(-1)
    i = torch.arange(n, device=device).repeat_interleave(k)
    offset = torch.randint(1, n, (n * k,), generator=generator).to(device)
    return i, (i + offset) % n


class RankingPairAttention(nn.Module):
    """Ranking-aware attention over image pairs, then a pair logit.

    With learnable queries ``R [Q, d]``, per head ``q = R Wq``, ``k_i = z_i Wk``, ``v_i = z_i Wv``
    and scores ``S_i = q k_iᵀ / √dh  [Q, P]``, the pair ``(i, j)`` attends over the ``2P``
    keys of ``[z_i ; z_j]`` with one softmax, ``[A_i A_j] = softmax([S_i S_j])``, and returns

        o_ij = A_i v_i − A_j v_j                       (per head, [Q, dh])
        p_ij = MLP( Σ_q Wo o_ij[q] + bo )              (the pair logit)

    Exact factorisation used here (no ``[pairs, Q, 2P]`` tensor): with per-image
    ``m_i = max_p S_i``, ``e_i = Σ_p exp(S_i − m_i)``, ``u_i = exp(S_i − m_i) v_i``,
    and ``m = max(m_i, m_j)``,

        o_ij = (u_i·exp(m_i − m) − u_j·exp(m_j − m)) / (e_i·exp(m_i − m) + e_j·exp(m_j − m)).

    Memory: the per-image terms take ``O(B·P·d)``; the pairs are processed ``chunk`` at a
    time, each chunk holding ``O(chunk·Q·d)`` floats (``chunk·Q·d·4`` bytes, e.g. 4 MiB for
    1024 pairs at Q=16, d=64), so nothing grows as ``B²·P``.  In training, autograd keeps each
    chunk's activations until backward: ``O(pairs·Q·d)`` in all; sample ``k`` partners per
    image (:func:`pair_index`) to bound it for large batches.
    """

    def __init__(self, width: int, heads: int = 8, queries: int = 16, mlp_blocks: int = 3, chunk: int = 1024):
        super().__init__()
        if width % heads:
            raise LavaConfigError(f"ranking attention: width {width} is not divisible by heads {heads}")
        if chunk < 1:
            raise LavaConfigError(f"ranking attention: chunk must be >= 1; got {chunk}")
        self.width, self.heads, self.n_queries, self.chunk = width, heads, queries, chunk
        self.queries = nn.Parameter(torch.randn(queries, width) * width ** -0.5)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.head = mlp_head(width, mlp_blocks)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [..., L, d] -> [..., H, L, dh]
        *lead, length, _ = x.shape
        return x.reshape(*lead, length, self.heads, self.width // self.heads).transpose(-3, -2)

    def image_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image ``(m [B,H,Q], e [B,H,Q], u [B,H,Q,dh])`` of the factorisation above."""
        q = self._split(self.q_proj(self.queries))  # [H, Q, dh]
        k, v = self._split(self.k_proj(z)), self._split(self.v_proj(z))  # [B, H, P, dh]
        scores = torch.einsum("hqc,bhpc->bhqp", q, k) / math.sqrt(q.shape[-1])
        m = scores.amax(-1)
        w = torch.exp(scores - m[..., None])
        return m, w.sum(-1), torch.einsum("bhqp,bhpc->bhqc", w, v)

    def pair_features(self, terms, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """``Σ_q Wo o_ij[q] + bo`` for the pairs ``(i, j)``: ``[len(i), d]``."""
        m, e, u = terms
        mi, mj = m[i], m[j]
        top = torch.maximum(mi, mj)
        ai, aj = torch.exp(mi - top), torch.exp(mj - top)
        o = (u[i] * ai[..., None] - u[j] * aj[..., None]) / (e[i] * ai + e[j] * aj)[..., None]  # [n, H, Q, dh]
        o = o.transpose(1, 2).reshape(len(i), self.n_queries, self.width)
        return self.out_proj(o).sum(1)

    def forward(self, z: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Pair logits ``[len(i)]`` for text-conditioned tokens ``z [B, P, d]``, ``chunk`` pairs at a time."""
        terms = self.image_terms(z)
        out = [self.head(self.pair_features(terms, i[s:s + self.chunk], j[s:s + self.chunk])).squeeze(-1)
               for s in range(0, len(i), self.chunk)]
        return torch.cat(out) if out else z.new_zeros(0)


class MeanDifferencePairHead(nn.Module):
    """Ablation: pair logit from the difference of mean tokens, ``MLP(mean_p z_i − mean_p z_j)``."""

    def __init__(self, width: int, mlp_blocks: int = 3, chunk: int = 1024):
        super().__init__()
        self.chunk = chunk
        self.head = mlp_head(width, mlp_blocks)

    def forward(self, z: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        pooled = z.mean(1)
        out = [self.head(pooled[i[s:s + self.chunk]] - pooled[j[s:s + self.chunk]]).squeeze(-1)
               for s in range(0, len(i), self.chunk)]
        return torch.cat(out) if out else z.new_zeros(0)
