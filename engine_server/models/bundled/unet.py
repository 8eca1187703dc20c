"""The bundled prior's UNet, written out: the same network and parameter names as the diffusers
``UNet2DModel`` it was trained as (``DownBlock2D`` / ``AttnDownBlock2D`` levels, ``UNetMidBlock2D``,
positional timestep embedding with ``flip_sin_to_cos``, identity class embedding, SiLU, GroupNorm).

Why not diffusers' own class: importing ``diffusers.models.unets`` pulls in every transformer
the library ships (and peft), 5-7 s on two CPU cores before a draft can print its first line;
the draft never needs any of it. The weights file is unchanged: a state dict saved from either
class loads into the other, and ``tests/models/test_bundled_unet.py`` checks the outputs agree.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features (B, dim) of timesteps (B,): [cos, sin] of t * 10000^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (parameter names ``linear_1`` / ``linear_2``, as diffusers')."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between; 1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels, residual (diffusers' ``Attention`` of a UNet2D block)."""

    def __init__(self, channels: int, head_dim: int, groups: int) -> None:
        super().__init__()
        self.heads = channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-5)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, h * w, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(tokens)), heads(self.to_k(tokens)),
                                             heads(self.to_v(tokens)))
        out = self.to_out[0](out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnets (each followed by attention where the level has it), then a resampler."""

    def __init__(self, resnets: list[ResnetBlock], attention: bool, channels: int, head_dim: int, groups: int,
                 resample: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attention:
            self.attentions = nn.ModuleList(SelfAttention(channels, head_dim, groups) for _ in resnets)
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(channels)])

    def attend(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.attentions[i](x) if hasattr(self, "attentions") else x


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, temb: int, head_dim: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, temb, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, head_dim, groups)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, emb)
        return self.resnets[1](self.attentions[0](x), emb)


class BundledUNet2D(nn.Module):
    """Noisy image (B, C_in, H, W), timesteps (B,), condition vector (B, 4 C0) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, attention_levels: tuple[bool, ...], norm_num_groups: int,
                 attention_head_dim: int) -> None:
        super().__init__()
        if len(attention_levels) != len(block_out_channels):
            raise ValueError("attention_levels must have one entry per block_out_channels level")
        chans, groups, head = tuple(block_out_channels), norm_num_groups, attention_head_dim
        self.time_features = chans[0]
        temb = 4 * chans[0]
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb)
        self.down_blocks = nn.ModuleList()
        cin = chans[0]
        for i, cout in enumerate(chans):
            resnets = [ResnetBlock(cin if j == 0 else cout, cout, temb, groups) for j in range(layers_per_block)]
            self.down_blocks.append(Level(resnets, attention_levels[i], cout, head, groups,
                                          "down" if i < last else None))
            cin = cout
        self.mid_block = MidBlock(chans[-1], temb, head, groups)
        # Skip widths in the order the up path consumes them (last stored first), as UNet2DModel builds them.
        skips = [chans[0]] + [c for i, c in enumerate(chans) for _ in range(layers_per_block + (i < last))]
        self.up_blocks = nn.ModuleList()
        prev = chans[-1]
        for i, cout in enumerate(reversed(chans)):
            level = last - i
            resnets = []
            for _ in range(layers_per_block + 1):
                resnets.append(ResnetBlock(prev + skips.pop(), cout, temb, groups))
                prev = cout
            self.up_blocks.append(Level(resnets, attention_levels[level], cout, head, groups,
                                        "up" if level > 0 else None))
        self.conv_norm_out = nn.GroupNorm(groups, chans[0], eps=1e-5)
        self.conv_out = nn.Conv2d(chans[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embedding(timestep_features(t, self.time_features).to(x.dtype)) + cond.to(x.dtype)
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for i, resnet in enumerate(level.resnets):
                h = level.attend(i, resnet(h, emb))
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)
        h = self.mid_block(h, emb)
        for level in self.up_blocks:
            for i, resnet in enumerate(level.resnets):
                h = level.attend(i, resnet(torch.cat([h, skips.pop()], dim=1), emb))
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
