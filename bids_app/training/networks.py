"""3D U-Net architectures (Keras 3) used by conus.

- :func:`unet3d`: the shipped family, a plain 3D U-Net (two 3x3x3 conv + norm + ReLU per level,
  max-pooling down, transposed convolution up, skip connections, sigmoid output). conus ships
  base 8, depth 3 (filters 8-16-32, bottleneck 64).
- :func:`thesis_unet`: the wider network of the thesis conus follows, kept for comparison at equal
  training wall-clock time (see the model card).

Layer names encode the path ("enc*" and "bottleneck*" form the contraction path, "dec*" the
expansion path) so that fine-tuning presets can freeze a path by name without network surgery.
Only imported by training and inference code paths (imports TensorFlow/Keras at module level).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

#: layer-name prefixes of the contraction path (encoder levels and bottleneck)
CONTRACTION_PREFIXES = ("enc", "bottleneck")
#: layer-name prefixes of the expansion path
EXPANSION_PREFIXES = ("dec", "output")


def _norm(name: str, kind: str) -> layers.Layer:
    if kind == "batch":
        return layers.BatchNormalization(name=name)
    if kind == "instance":
        return layers.GroupNormalization(groups=-1, name=name)
    raise ValueError(f"unknown normalisation {kind!r}")


def _conv_block(x, filters: int, prefix: str, n_convs: int, norm: str):
    for j in range(n_convs):
        x = layers.Conv3D(filters, 3, padding="same", use_bias=False, name=f"{prefix}_conv{j + 1}")(x)
        x = _norm(f"{prefix}_norm{j + 1}", norm)(x)
        x = layers.Activation("relu", name=f"{prefix}_relu{j + 1}")(x)
    return x


def unet3d(
    input_shape: Sequence[int | None] = (None, None, None, 1),
    *,
    base_filters: int = 8,
    depth: int = 3,
    convs_per_level: int = 2,
    norm: str = "batch",
    name: str = "unet3d",
    outputs: int = 1,
) -> keras.Model:
    """Plain 3D U-Net with ``depth`` poolings; spatial input sizes must be divisible by 2**depth.

    ``input_shape`` may leave spatial sizes as None so one model serves any patch size. The
    output is ``outputs`` sigmoid channels (channel 0: cord probability) of the input's spatial
    shape.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, f"enc{level + 1}", convs_per_level, norm)
        skips.append(x)
        x = layers.MaxPooling3D(2, name=f"enc{level + 1}_pool")(x)
    x = _conv_block(x, base_filters * 2**depth, "bottleneck", convs_per_level, norm)
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = layers.Conv3DTranspose(filters, 2, strides=2, name=f"dec{level + 1}_up")(x)
        x = layers.Concatenate(name=f"dec{level + 1}_concat")([x, skips[level]])
        x = _conv_block(x, filters, f"dec{level + 1}", convs_per_level, norm)
    probs = layers.Conv3D(int(outputs), 1, activation="sigmoid", name="output", dtype="float32")(x)
    return keras.Model(inputs, probs, name=name)


def thesis_unet(input_shape: Sequence[int | None] = (None, None, None, 1), outputs: int = 1) -> keras.Model:
    """Thesis-scale comparison network: a shallow, wide 3D U-Net (base 18, depth 2, batch norm).

    The thesis reports 468,817 parameters for its 64x64x48 network and 7.9 s per training step
    here, but not its layer list, and no plain U-Net variant reproduces that count exactly. This
    network has a comparable size (430,327 parameters) and, like the thesis network, spends most
    of its compute at full resolution; it is what "thesis" means in comparisons, and its own
    parameter count and speed are what conus reports.
    """
    return unet3d(input_shape, base_filters=18, depth=2, norm="batch", name="thesis_unet", outputs=outputs)


ARCHITECTURES = {
    "unet3d-b8d3": lambda shape, outputs=1: unet3d(shape, base_filters=8, depth=3, norm="instance",
                                                   name="unet3d_b8d3", outputs=outputs),
    "thesis": thesis_unet,
}


def build_network(arch: str, input_shape: Sequence[int | None] = (None, None, None, 1),
                  outputs: int = 1) -> keras.Model:
    """Build a network with ``outputs`` sigmoid channels by its registered name (see :data:`ARCHITECTURES`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](input_shape, outputs=outputs)


def is_contraction_layer(layer_name: str) -> bool:
    """True when a layer belongs to the contraction path (encoder + bottleneck)."""
    return layer_name.startswith(CONTRACTION_PREFIXES)
