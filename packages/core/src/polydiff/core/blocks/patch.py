"""Patchify / unpatchify between signals and token sequences.

Token features are ordered channel-major, ``(c, *patch_offsets)``, which is the flattening order
of a ``Conv{1,2,3}d`` weight with kernel = stride = patch. Tokens follow the row-major order of
the patch grid (last axis fastest), the same order as ``grid_positions``.
"""

import math
from collections.abc import Sequence

from einops import rearrange
from torch import Tensor, nn


def _check_divisible(fn: str, sizes: dict[str, int], patch: Sequence[int]) -> None:
    for (name, size), p in zip(sizes.items(), patch, strict=True):
        if p < 1 or size % p != 0:
            raise ValueError(f"{fn}: {name} {size} is not divisible by patch size {p}")


def _check_tokens(fn: str, tokens: Tensor, count: int, width: int) -> None:
    if tokens.ndim != 3 or tokens.shape[1] != count or tokens.shape[2] != width:
        raise ValueError(
            f"{fn}: expected tokens of shape (B, {count}, {width}), got {tuple(tokens.shape)}"
        )


def patchify_1d(x: Tensor, p: int) -> Tensor:
    """(B, C, L) -> (B, L / p, C * p) tokens of ``p`` consecutive samples."""
    _check_divisible("patchify_1d", {"length": x.shape[-1]}, [p])
    return rearrange(x, "b c (l p) -> b l (c p)", p=p)


def unpatchify_1d(tokens: Tensor, p: int, length: int, c: int) -> Tensor:
    """(B, length / p, c * p) tokens -> (B, c, length); inverse of :func:`patchify_1d`."""
    _check_divisible("unpatchify_1d", {"length": length}, [p])
    _check_tokens("unpatchify_1d", tokens, length // p, c * p)
    return rearrange(tokens, "b l (c p) -> b c (l p)", p=p, c=c)


def patchify_2d(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, (H / p) * (W / p), C * p * p) tokens of p x p patches."""
    _check_divisible("patchify_2d", {"height": x.shape[-2], "width": x.shape[-1]}, [p, p])
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=p, pw=p)


def unpatchify_2d(tokens: Tensor, p: int, h: int, w: int, c: int) -> Tensor:
    """Tokens (B, (h/p)*(w/p), c*p*p) -> (B, c, h, w); ``h``, ``w`` are the signal's sizes."""
    _check_divisible("unpatchify_2d", {"height": h, "width": w}, [p, p])
    _check_tokens("unpatchify_2d", tokens, (h // p) * (w // p), c * p * p)
    return rearrange(
        tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // p, w=w // p, ph=p, pw=p
    )


def spacetime_patchify(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """(B, C, T, H, W) -> (B, (T/pt)(H/ph)(W/pw), C*pt*ph*pw) tubelet tokens, time slowest."""
    t, h, w = x.shape[-3:]
    _check_divisible("spacetime_patchify", {"frames": t, "height": h, "width": w}, patch)
    pt, ph, pw = patch
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)


def spacetime_unpatchify(
    tokens: Tensor, patch: tuple[int, int, int], t: int, h: int, w: int, c: int
) -> Tensor:
    """Inverse of :func:`spacetime_patchify`: tokens -> (B, c, t, h, w) (signal sizes)."""
    _check_divisible("spacetime_unpatchify", {"frames": t, "height": h, "width": w}, patch)
    pt, ph, pw = patch
    _check_tokens(
        "spacetime_unpatchify", tokens, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw
    )
    return rearrange(
        tokens,
        "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
        t=t // pt,
        h=h // ph,
        w=w // pw,
        pt=pt,
        ph=ph,
        pw=pw,
    )


class PatchEmbed(nn.Module):
    """Patchify + Linear: (B, C, L) / (B, C, H, W) / (B, C, T, H, W) -> (B, N, dim) tokens.

    Args:
        in_ch: signal channels. dim: token width.
        patch: patch size (an int, or a (pt, ph, pw) tuple for ``dims=3``).
        dims: signal dimensionality, 1, 2 or 3.
    """

    def __init__(
        self, in_ch: int, dim: int, patch: int | tuple[int, int, int], dims: int = 2
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"PatchEmbed: dims must be 1, 2 or 3, got {dims}")
        if dims == 3:
            patch = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
        elif not isinstance(patch, int):
            raise ValueError(f"PatchEmbed: dims={dims} needs an int patch size, got {patch}")
        self.dims = dims
        self.patch = patch
        patch_volume = math.prod(patch) if dims == 3 else patch**dims
        self.proj = nn.Linear(in_ch * patch_volume, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Embed a (B, in_ch, *spatial) signal into (B, N, dim) tokens in patch-grid order."""
        if x.ndim != self.dims + 2:
            raise ValueError(
                f"PatchEmbed(dims={self.dims}) expects a {self.dims + 2}D input, "
                f"got shape {tuple(x.shape)}"
            )
        if self.dims == 1:
            tokens = patchify_1d(x, self.patch)
        elif self.dims == 2:
            tokens = patchify_2d(x, self.patch)
        else:
            tokens = spacetime_patchify(x, self.patch)
        return self.proj(tokens)
