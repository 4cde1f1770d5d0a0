"""DC-GAN generator and discriminator for person images (Radford et al., 2016).

Person images are taller than wide, so both networks work on an (H, W) grid that starts (generator) or ends
(discriminator) at (4, 4·W/H): 64×32 images use a 4×2 seed and four stride-2 stages, 128×64 and 128×128 use five.
Layer widths follow the DC-GAN recipe: the last generator stage and the first discriminator stage have ``width``
channels and every stage towards the seed doubles them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reid_core.models import register_model


def dcgan_stages(image_size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """Number of stride-2 stages and the seed grid (h0, w0) for an (H, W) image."""
    h, w = image_size
    n = int(round(math.log2(h / 4))) if h >= 8 else 0
    seed = (4, w * 4 // h if h else 0)
    if n < 1 or 4 * 2**n != h or seed[1] < 1 or seed[1] * 2**n != w:
        raise ValueError(
            f"DC-GAN image_size {tuple(image_size)} is not supported: height must be 4·2^k (k ≥ 1) and width "
            "height·m/4 for an integer m ≥ 1 (e.g. 64×32, 128×64, 128×128)"
        )
    return n, seed


def init_dcgan_weights(module: nn.Module) -> None:
    """DC-GAN initialisation: conv weights N(0, 0.02); batch-norm scale N(1, 0.02), shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z (N, z_dim) -> image (N, channels, H, W) in [-1, 1] (tanh)."""

    def __init__(self, *, z_dim: int = 100, width: int = 64, image_size: tuple[int, int] = (64, 32), channels: int = 3):
        super().__init__()
        n, (h0, w0) = dcgan_stages(tuple(image_size))
        self.z_dim = z_dim
        self.image_size = tuple(image_size)
        c = width * 2 ** (n - 1)
        layers: list[nn.Module] = [
            # (N, z, 1, 1) -> (N, c, h0, w0): a full projection of z onto the seed grid
            nn.ConvTranspose2d(z_dim, c, (h0, w0), 1, 0, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(True),
        ]
        for _ in range(n - 1):
            # (N, c, h, w) -> (N, c/2, 2h, 2w)
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        # (N, width, H/2, W/2) -> (N, channels, H, W)
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], self.z_dim, 1, 1))


class Discriminator(nn.Module):
    """image (N, channels, H, W) -> logit (N,): the score that the image is real (before the sigmoid).

    Returning logits (not probabilities) lets the losses use the numerically stable
    ``binary_cross_entropy_with_logits``.
    """

    def __init__(self, *, width: int = 64, image_size: tuple[int, int] = (64, 32), channels: int = 3):
        super().__init__()
        n, (h0, w0) = dcgan_stages(tuple(image_size))
        self.image_size = tuple(image_size)
        # (N, channels, H, W) -> (N, width, H/2, W/2); no batch norm on the input layer (DC-GAN recipe)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        c = width
        for _ in range(n - 1):
            # (N, c, h, w) -> (N, 2c, h/2, w/2)
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c * 2), nn.LeakyReLU(0.2, True)]
            c *= 2
        # (N, c, h0, w0) -> (N, 1, 1, 1)
        layers += [nn.Conv2d(c, 1, (h0, w0), 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)
        init_dcgan_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


@register_model("dcgan_generator", role="gan", check_size=dcgan_stages)
def dcgan_generator(*, z_dim: int = 100, width: int = 64, image_size: tuple[int, int] = (64, 32), channels: int = 3):
    return Generator(z_dim=z_dim, width=width, image_size=image_size, channels=channels)


@register_model("dcgan_discriminator", role="gan", check_size=dcgan_stages)
def dcgan_discriminator(*, width: int = 64, image_size: tuple[int, int] = (64, 32), channels: int = 3):
    return Discriminator(width=width, image_size=image_size, channels=channels)
