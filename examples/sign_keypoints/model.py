"""A BART-style keypoint encoder-decoder transformer for isolated sign recognition (plain torch.nn).

Names follow Hugging Face BART (``encoder.layers.N.self_attn.q_proj``, ``decoder.layers.N.encoder_attn.k_proj``,
``fc1``/``fc2``, ``*_layer_norm``) so name-based quantization rules written for BART apply unchanged. Attention
reshapes with ``unflatten``/``flatten`` and calls ``scaled_dot_product_attention``, with no Python control flow
on tensor shapes, so the model traces with ``torch.fx`` and ``torch.export``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    """Multi-head attention with BART's projection names; ``key_value`` is the query itself for self-attention."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, d_model // heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        return z.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key_value))
        v = self._heads(self.v_proj(key_value))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """BART encoder layer (post-norm): self-attention, then the fc1 -> GELU -> fc2 feed-forward."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, x)))
        return self.final_layer_norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class DecoderLayer(nn.Module):
    """BART decoder layer (post-norm): self-attention over the queries, cross-attention to the encoder, FFN."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = Attention(d_model, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, x)))
        x = self.encoder_attn_layer_norm(x + self.dropout(self.encoder_attn(x, memory)))
        return self.final_layer_norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class Encoder(nn.Module):
    """Keypoint projection + learned positions + LayerNorm, then the encoder layers."""

    def __init__(self, in_features: int, frames: int, d_model: int, heads: int, ffn_dim: int, layers: int,
                 dropout: float):  # fmt: skip
        super().__init__()
        self.embed_keypoints = nn.Linear(in_features, d_model)
        self.embed_positions = nn.Parameter(torch.randn(1, frames, d_model) * 0.02)
        self.layernorm_embedding = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, ffn_dim, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.layernorm_embedding(self.embed_keypoints(x) + self.embed_positions))
        for layer in self.layers:
            h = layer(h)
        return h


class Decoder(nn.Module):
    """Learned query tokens that cross-attend the encoder output (one per query, pooled by the head)."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int, layers: int, num_queries: int, dropout: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, d_model) * 0.02)
        self.layernorm_embedding = nn.LayerNorm(d_model)
        self.layers = nn.ModuleList(DecoderLayer(d_model, heads, ffn_dim, dropout) for _ in range(layers))

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        h = self.layernorm_embedding(self.queries.expand(memory.shape[0], -1, -1))
        for layer in self.layers:
            h = layer(h, memory)
        return h


class SignBart(nn.Module):
    """Keypoint sequence (B, frames, keypoints*2) -> sign logits (B, num_classes)."""

    def __init__(
        self,
        num_keypoints: int = 21,
        frames: int = 24,
        num_classes: int = 8,
        d_model: int = 64,
        heads: int = 4,
        ffn_dim: int = 128,
        encoder_layers: int = 2,
        decoder_layers: int = 1,
        num_queries: int = 1,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.encoder = Encoder(num_keypoints * 2, frames, d_model, heads, ffn_dim, encoder_layers, dropout)
        self.decoder = Decoder(d_model, heads, ffn_dim, decoder_layers, num_queries, dropout)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.decoder(self.encoder(x)).mean(dim=1))
