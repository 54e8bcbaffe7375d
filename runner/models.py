"""The model registry: the classic tutorial models and any `package.module:factory`."""

from __future__ import annotations

import torch
from torch import nn

from runner.errors import usage_error
from runner.imports import call_with_known_kwargs, load_object


class MLP(nn.Module):
    """The tutorial MLP: flatten → Linear(C·H·W, 128) → ReLU → Linear(128, classes)."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """A small conv net (two conv/BN/ReLU/pool blocks, then two linear layers); any input size."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net denoiser: 4 levels, skip connections by `torch.cat`, residual output (x + correction)."""

    def __init__(self, channels: int = 3, widths: tuple[int, int, int, int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        self.enc1, self.enc2 = _double_conv(channels, w1), _double_conv(w1, w2)
        self.enc3, self.bottom = _double_conv(w2, w3), _double_conv(w3, w4)
        self.pool = nn.MaxPool2d(2)
        self.up3, self.dec3 = nn.ConvTranspose2d(w4, w3, 2, stride=2), _double_conv(2 * w3, w3)
        self.up2, self.dec2 = nn.ConvTranspose2d(w3, w2, 2, stride=2), _double_conv(2 * w2, w2)
        self.up1, self.dec1 = nn.ConvTranspose2d(w2, w1, 2, stride=2), _double_conv(2 * w1, w1)
        self.head = nn.Conv2d(w1, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        b = self.bottom(self.pool(e3))
        d3 = self.dec3(torch.cat([self.up3(b), e3], dim=1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return x + self.head(d1)


def _resnet18(channels: int, num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)  # never downloads weights
    if channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def build_model(name: str, channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A fresh model by registry name or import path, for inputs of shape (channels, size, size)."""
    if name == "mlp":
        return MLP(channels * image_size * image_size, num_classes)
    if name == "cnn":
        return CNN(channels, num_classes)
    if name == "resnet18":
        return _resnet18(channels, num_classes)
    if name == "tinyunet":
        return UNet(channels, (16, 32, 64, 128))
    if name == "unet":
        return UNet(channels, (64, 128, 256, 512))
    factory = load_object(name, what="model")
    model = call_with_known_kwargs(factory, what=f"model factory {name}", in_channels=channels,
                                   channels=channels, image_size=image_size, num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise usage_error(f"model factory {name} returned {type(model).__name__}, not a torch.nn.Module")
    return model
