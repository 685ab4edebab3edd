"""The Pixtral vision encoder and the projector that turns its patches into decoder embeddings.

``VisionTower(images) -> one [n_tokens, text_hidden] tensor per image``: one row per ``[IMG]`` token of that
image, in mistral-common's order (row-major over the merged patch grid). Images arrive already resized and
normalised by mistral-common ([C, H, W], H and W multiples of the patch size); preprocessing is not done here.

The math follows transformers' ``PixtralVisionModel`` + ``Mistral3MultiModalProjector`` (vision_feature_layer -1:
the last block's output, no final norm):

* patch conv (no bias) -> RMSNorm ``ln_pre`` -> pre-norm blocks (attention with 2D rope, SwiGLU);
* attention never crosses images: the patches of several images are one sequence for the linear layers, and
  attention runs per image (block-diagonal by construction);
* projector: RMSNorm -> 2x2 patch merger -> linear -> GELU -> linear.

Internal q/k row layout: **rotate-half** (transformers'). Within each head, lanes ``i`` and ``i + head_dim/2``
form a rope pair. Mistral-native checkpoints store the rows in interleaved order (lanes ``2i``, ``2i+1`` pair);
the loader converts them with ``interleaved_to_rotate_half``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from small4.config import ConfigError, VisionConfig
from small4.model.layers import RMSNorm

# Pixtral's block norms use a fixed eps in every reference (transformers, mistral-inference, vLLM).
PIXTRAL_NORM_EPS = 1e-5

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf) GELU, as transformers' ACT2FN["gelu"]
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _activation(name: str, field_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"config field '{field_name}': unsupported activation {name!r}")
    return _ACTIVATIONS[name]


def interleaved_to_rotate_half(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q/k projection rows, per head, from interleaved rope order (native) to rotate-half order (internal).

    Interleaved row ``2i + j`` of a head becomes row ``j * head_dim/2 + i``."""
    out_dim, inn = w.shape
    head_dim = out_dim // num_heads
    w = w.reshape(num_heads, head_dim // 2, 2, inn)  # [heads, hd/2, 2, in] (pair i, member j)
    return w.transpose(1, 2).reshape(out_dim, inn)  # [heads * 2 * hd/2, in] (member j, pair i)


class VisionRope:
    """2D rotary angles for patch (row, col) positions, precomputed over the largest grid the config allows
    (``image_size // patch_size`` patches per side). Half of the rotated pairs turn with the row, half with the
    column: row angles use the even-indexed inverse frequencies, column angles the odd ones, as Pixtral does.

    Plain float32 CPU tensors, not buffers: building the model on the meta device or casting it never degrades
    them; they follow the activations to their device on first use."""

    def __init__(self, cfg: VisionConfig) -> None:
        dim = cfg.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim  # [dim/2]
        inv_freq = 1.0 / (cfg.rope_theta**exponents)
        self.max_side = cfg.image_size // cfg.patch_size
        pos = torch.arange(self.max_side, dtype=torch.float32, device="cpu")
        self.rows = pos[:, None] * inv_freq[None, 0::2]  # [max_side, dim/4]
        self.cols = pos[:, None] * inv_freq[None, 1::2]  # [max_side, dim/4]

    def cos_sin(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [h*w, head_dim] for an h x w patch grid, row-major, laid out for rotate-half."""
        if h > self.max_side or w > self.max_side:
            raise ValueError(f"image of {h}x{w} patches exceeds the vision encoder's {self.max_side} per side")
        if self.rows.device != device:
            self.rows, self.cols = self.rows.to(device), self.cols.to(device)
        quarter = self.rows.shape[1]
        angles = torch.cat(
            [
                self.rows[:h, None, :].expand(h, w, quarter),  # [h, w, dim/4]
                self.cols[None, :w, :].expand(h, w, quarter),  # [h, w, dim/4]
            ],
            dim=-1,
        ).reshape(h * w, 2 * quarter)  # [h*w, dim/2]
        angles = torch.cat([angles, angles], dim=-1)  # [h*w, dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        inner = cfg.num_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """x [N, D] (the patches of all images, image after image); attention stays inside each image."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)  # [N, heads, hd]
        k = self.k_proj(x).view(n, self.num_heads, self.head_dim)  # [N, heads, hd]
        v = self.v_proj(x).view(n, self.num_heads, self.head_dim)  # [N, heads, hd]
        cos, sin = cos[:, None, :], sin[:, None, :]  # [N, 1, hd]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = []
        for qi, ki, vi in zip(q.split(lens), k.split(lens), v.split(lens), strict=True):
            o = F.scaled_dot_product_attention(
                qi.transpose(0, 1),  # [heads, n_i, hd]
                ki.transpose(0, 1),
                vi.transpose(0, 1),
                scale=self.scale,
            )  # [heads, n_i, hd]
            out.append(o.transpose(0, 1))  # [n_i, heads, hd]
        return self.o_proj(torch.cat(out).reshape(n, self.num_heads * self.head_dim))  # [N, heads*hd] -> [N, D]


class VisionFeedForward(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _activation(cfg.hidden_act, "vision_config.hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, PIXTRAL_NORM_EPS)
        self.attention = VisionAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, PIXTRAL_NORM_EPS)
        self.feed_forward = VisionFeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lens: list[int]) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, lens)
        return x + self.feed_forward(self.ffn_norm(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))


class PixtralEncoder(nn.Module):
    """Images -> patch features [sum of h_i*w_i, vision hidden] (image after image, each row-major) and the
    patch grid (h_i, w_i) of each image."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_conv = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.ln_pre = RMSNorm(cfg.hidden_size, PIXTRAL_NORM_EPS)
        self.transformer = VisionTransformer(cfg)
        self.rope = VisionRope(cfg)

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        weight = self.patch_conv.weight
        patches, grids = [], []
        for image in images:
            grid = self.patch_conv(image.to(device=weight.device, dtype=weight.dtype)[None])[0]  # [D, h, w]
            grids.append((grid.shape[1], grid.shape[2]))
            patches.append(grid.flatten(1).t())  # [h*w, D]
        x = self.ln_pre(torch.cat(patches))  # [N, D]
        cos_sin = [self.rope.cos_sin(h, w, x.dtype, x.device) for h, w in grids]
        cos = torch.cat([c for c, _ in cos_sin])  # [N, hd]
        sin = torch.cat([s for _, s in cos_sin])  # [N, hd]
        lens = [h * w for h, w in grids]
        for block in self.transformer.layers:
            x = block(x, cos, sin, lens)
        return x, grids


class PatchMerger(nn.Module):
    """Concatenates each ``merge x merge`` square of patches and projects it back to the vision width.

    The concatenated features are ordered channel-major, then row and column inside the square
    (``c * merge^2 + di * merge + dj``), which is what ``torch.nn.functional.unfold`` produces in the reference;
    squares come out row-major. Grids with an odd side drop their last row/column, as unfold does."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.merge = cfg.spatial_merge_size
        self.merging_layer = nn.Linear(cfg.hidden_size * self.merge**2, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        m, d = self.merge, x.shape[-1]
        out = []
        for feats, (h, w) in zip(x.split([h * w for h, w in grids]), grids, strict=True):
            hm, wm = h // m, w // m
            g = feats.view(h, w, d)[: hm * m, : wm * m]  # [hm*m, wm*m, D]
            g = g.reshape(hm, m, wm, m, d).permute(0, 2, 4, 1, 3)  # [hm, wm, D, m(row), m(col)]
            out.append(g.reshape(hm * wm, d * m * m))  # [hm*wm, D*m*m]
        return self.merging_layer(torch.cat(out))  # [sum hm*wm, D]


class MultiModalProjector(nn.Module):
    """Patch features -> decoder embeddings: RMSNorm, patch merger, linear, activation, linear.

    ``norm_eps``: transformers builds this norm with the *text* model's rms_norm_eps; we do the same."""

    def __init__(self, cfg: VisionConfig, text_hidden: int, norm_eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, norm_eps)
        self.patch_merger = PatchMerger(cfg)
        self.linear_1 = nn.Linear(cfg.hidden_size, text_hidden, bias=cfg.projector_bias)
        self.act = _activation(cfg.projector_hidden_act, "projector_hidden_act")
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """x [N, vision hidden] -> [sum of merged patches, text_hidden]."""
        return self.linear_2(self.act(self.linear_1(self.patch_merger(self.norm(x), grids))))


class VisionTower(nn.Module):
    """Preprocessed images -> one embedding per ``[IMG]`` token, per image."""

    def __init__(self, cfg: VisionConfig, text_hidden: int, projector_norm_eps: float | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = PixtralEncoder(cfg)
        eps = cfg.rms_norm_eps if projector_norm_eps is None else projector_norm_eps
        self.projector = MultiModalProjector(cfg, text_hidden, eps)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """images: [C, H, W] each -> [n_tokens_i, text_hidden] each, rows in ``[IMG]`` order (row-major)."""
        if not images:
            return []
        feats, grids = self.encoder(images)
        merged = self.projector(feats, grids)  # [sum n_tokens_i, text_hidden]
        m = self.cfg.spatial_merge_size
        return list(merged.split([(h // m) * (w // m) for h, w in grids]))
