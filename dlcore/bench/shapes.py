"""Parameter shapes of reference models, built without torchvision (for optimizer benchmarks)."""
from __future__ import annotations


def resnet18_param_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """torchvision's resnet18 parameters in order (11,689,512 with 1000 classes)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first = block == 0
            shapes += [(out_ch, in_ch if first else out_ch, 3, 3), (out_ch,), (out_ch,),
                       (out_ch, out_ch, 3, 3), (out_ch,), (out_ch,)]
            if first and (stride != 1 or in_ch != out_ch):
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
        in_ch = out_ch
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes
