"""The pretrained networks `model=pretrained` offers, by their config name.

Each name maps to its Keras Applications constructor and to the module whose `preprocess_input`
is that network's own input preprocessing (a pass-through where the network preprocesses
inside itself, as MobileNetV3 and EfficientNet do). Names only, resolved in `pipeline.models`,
so that the config checks a name without importing Keras.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backbone:
    constructor: str  # keras.applications.<constructor>
    preprocessing: str  # keras.applications.<preprocessing>.preprocess_input


BACKBONES = {
    "mobilenet_v3_small": Backbone("MobileNetV3Small", "mobilenet_v3"),
    "efficientnet_b0": Backbone("EfficientNetB0", "efficientnet"),
    "resnet50": Backbone("ResNet50", "resnet50"),
}
IMAGENET = "imagenet"  # model.weights: Keras downloads the network's ImageNet weights
# The smallest height and width these networks take without their classifier top; smaller
# images are resized up to it inside the model.
MIN_INPUT_SIZE = 32
