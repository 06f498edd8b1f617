"""Tiny models and function-preserving permutations for the merge tests (imported by name: unique module)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from attnfuse.nn import Encoder


class TinyViT(nn.Module):
    """Tokens ``(B, N, F)`` -> linear embedding, CLS, position embedding -> Encoder -> linear head on CLS."""

    def __init__(self, in_features: int = 5, num_tokens: int = 6, dim: int = 16, depth: int = 2, heads: int = 4,
                 num_classes: int = 3) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, num_tokens + 1, dim) * 0.5)
        self.embed = nn.Linear(in_features, dim)
        self.encoder = Encoder(dim, depth=depth, heads=heads, mlp_ratio=2.0)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.encoder(t)[:, 0])


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Random LayerNorm affine parameters, so that no symmetry hides a wrong map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model


def permuted_copy(model: TinyViT, seed: int) -> tuple[TinyViT, dict[str, Tensor]]:
    """A function-preserving permutation of ``model`` (written out here, independently of attnfuse.merge).

    One residual-stream permutation; per block a head permutation, a within-head permutation shared by Q
    and K, another for V (with the matching ``proj`` columns) and an MLP hidden permutation. Returns the
    copy and the permutations (``new[j] = old[perm[j]]``).
    """
    g = torch.Generator().manual_seed(seed)
    b = copy.deepcopy(model)
    d = b.embed.out_features
    res = torch.randperm(d, generator=g)
    perms = {"stream": res}

    def take(t: Tensor, dim: int, idx: Tensor) -> Tensor:
        return t.index_select(dim, idx)

    with torch.no_grad():
        b.cls.copy_(take(b.cls, 2, res))
        b.pos.copy_(take(b.pos, 2, res))
        b.embed.weight.copy_(take(b.embed.weight, 0, res))
        b.embed.bias.copy_(take(b.embed.bias, 0, res))
        b.head.weight.copy_(take(b.head.weight, 1, res))
        for ln in (b.encoder.norm,):
            ln.weight.copy_(take(ln.weight, 0, res))
            ln.bias.copy_(take(ln.bias, 0, res))
        for i, blk in enumerate(b.encoder.blocks):
            h, dh = blk.attn.heads, blk.attn.head_dim
            hp, qk, vp = torch.randperm(h, generator=g), torch.randperm(dh, generator=g), torch.randperm(dh, generator=g)
            p_qk = (hp[:, None] * dh + qk[None, :]).reshape(-1)
            p_v = (hp[:, None] * dh + vp[None, :]).reshape(-1)
            hid = torch.randperm(blk.mlp.fc1.out_features, generator=g)
            perms.update({f"b{i}.qk": p_qk, f"b{i}.v": p_v, f"b{i}.fc1": hid})
            for ln in (blk.norm_self, blk.norm_mlp):
                ln.weight.copy_(take(ln.weight, 0, res))
                ln.bias.copy_(take(ln.bias, 0, res))
            for lin, out in ((blk.attn.to_q, p_qk), (blk.attn.to_k, p_qk), (blk.attn.to_v, p_v)):
                lin.weight.copy_(take(take(lin.weight, 0, out), 1, res))
                lin.bias.copy_(take(lin.bias, 0, out))
            blk.attn.proj.weight.copy_(take(take(blk.attn.proj.weight, 0, res), 1, p_v))
            blk.attn.proj.bias.copy_(take(blk.attn.proj.bias, 0, res))
            blk.mlp.fc1.weight.copy_(take(take(blk.mlp.fc1.weight, 0, hid), 1, res))
            blk.mlp.fc1.bias.copy_(take(blk.mlp.fc1.bias, 0, hid))
            blk.mlp.fc2.weight.copy_(take(take(blk.mlp.fc2.weight, 0, res), 1, hid))
            blk.mlp.fc2.bias.copy_(take(blk.mlp.fc2.bias, 0, res))
    return b, perms


class TinyParallelLM(nn.Module):
    """Character LM of parallel blocks (BAM layout): tokens ``(B, L)`` -> ``(logits (B, L, V), [aux per block])``."""

    def __init__(self, vocab: int = 11, dim: int = 16, depth: int = 2, heads: int = 2, context: int = 12) -> None:
        super().__init__()
        from attnfuse.nn import ParallelBlock

        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.1)
        self.blocks = nn.ModuleList(ParallelBlock(dim, heads, mlp_ratio=2.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        auxes = []
        for blk in self.blocks:
            x, aux = blk(x, is_causal=True)
            auxes.append(aux)
        return self.head(self.norm(x)), auxes
