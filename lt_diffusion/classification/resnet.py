"""ResNet-18 for 32 x 32 inputs (He et al. 2016), adapted to CIFAR as the long-tail
classification papers do: a 3 x 3, stride-1 stem without the max-pool (so a 32 px image keeps
32 px in the first stage and reaches 4 px in the last), and, for LDAM, a cosine classifier head.

The residual blocks are torchvision's own ``BasicBlock`` and the module names are torchvision's
(``conv1``, ``bn1``, ``layer1`` .. ``layer4``, ``fc``), so at ``width=64`` the network is
torchvision's ``resnet18`` with ``conv1`` swapped for the 3 x 3 stem and ``maxpool`` removed:
the same parameters under the same names (tests/test_classification.py loads one into the
other). ``width`` scales every stage (64, 128, 256, 512 at 64): the smoke tests use a narrow one.

Sources: the CIFAR stem as in Cao et al. 2019 (LDAM, their ``resnet_cifar.py`` ResNet-32 stem:
3 x 3, stride 1, no pooling) and Menon et al. 2021 (LA, same CIFAR ResNet); the CM paper
(Sec. G.11, Table G.13; Sec. G.5, Table G.8) trains a ResNet-18. The LDAM head
(:class:`NormedLinear`): Cao et al. 2019 normalise features and class weights
(``use_norm=True`` for the LDAM loss), so logits are cosines in [-1, 1] scaled by ``s`` in the
loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock


class NormedLinear(nn.Module):
    """Cosine classifier: ``logits_j = <x / ||x||, w_j / ||w_j||>`` (Cao et al. 2019)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # (out, in) like nn.Linear, so the low-rank split and merging treat it the same way
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


class CifarResNet(nn.Module):
    """A ResNet with ``BasicBlock`` stages for small images (see the module docstring).

    Args:
        num_classes: output logits.
        in_channels: image channels (3 for CIFAR, 1 for Fashion-MNIST).
        width: channels of the first stage; stage ``i`` has ``width * 2**i``.
        blocks: blocks per stage (ResNet-18: 2, 2, 2, 2).
        normed_head: a cosine classifier (:class:`NormedLinear`) instead of ``nn.Linear``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        blocks: Sequence[int] = (2, 2, 2, 2),
        normed_head: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"a classifier needs at least 2 classes, got num_classes={num_classes}"
            )
        if width < 1 or not blocks or min(blocks) < 1:
            raise ValueError(
                f"classifier.width must be >= 1 and classifier.blocks positive, got {width}, "
                f"{list(blocks)}"
            )
        self.num_classes, self.in_channels = int(num_classes), int(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes = width
        for i, n in enumerate(blocks):
            out = width * 2**i
            stage = [self._block(planes, out, stride=1 if i == 0 else 2)]
            stage += [BasicBlock(out, out) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            planes = out
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = (
            NormedLinear(planes, num_classes) if normed_head else nn.Linear(planes, num_classes)
        )
        # torchvision's ResNet initialisation (He et al. 2015, fan-out) for the convolutions.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _block(planes: int, out: int, stride: int) -> BasicBlock:
        downsample = None
        if stride != 1 or planes != out:  # torchvision's projection shortcut (option B)
            downsample = nn.Sequential(
                nn.Conv2d(planes, out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out),
            )
        return BasicBlock(planes, out, stride=stride, downsample=downsample)

    def features(self, x: Tensor) -> Tensor:
        """The pooled penultimate features, (B, channels of the last stage)."""
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
