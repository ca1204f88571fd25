"""Preprocessing that runs inside the compiled graph on the worker's device.

Pass one to ``register(..., preprocess=...)``: the inputs then travel as ``uint8`` pixels (a
quarter of the bytes of float32) and are cast, resized and normalised by TensorFlow ops
inside the same ``tf.function`` as the model, on the worker's GPU when it has one.

Presets cover common image models; a :class:`Preprocess` can also be built by hand, and any
function of TF ops works too (``preprocess=lambda x: tf.cast(x, tf.float32) / 255``).

Declared shared: the kernel builds a :class:`Preprocess` (no TensorFlow needed) and the
worker runs it, unpickled, inside the model's graph; so this module imports nothing of
nbtool (``tests/test_layout.py`` holds it to that).

Example:
    >>> from nbtool.preprocess import preset
    >>> preset("mobilenet")
    Preprocess(name='mobilenet', input_dtype='uint8', scale=0.00784313725490196, offset=-1.0, resize=None, mean=None, std=None)
    >>> eng.register("mnv3", "mobilenet.keras", preprocess=preset("rescale", resize=(224, 224)))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """``x -> (resize(cast(x)) * scale + offset - mean) / std``, as TensorFlow ops.

    ``input_dtype`` is what the compiled function takes (what the input must be); ``resize``
    is ``(height, width)``; ``mean``/``std`` are per channel, applied after scale/offset.

    Example:
        >>> p = Preprocess("half", scale=0.5, input_dtype="uint8")
        >>> import numpy as np
        >>> float(p(np.array([[2]], "uint8"))[0, 0])
        1.0
    """

    name: str
    input_dtype: str = "uint8"
    scale: float = 1.0
    offset: float = 0.0
    resize: tuple | None = None
    mean: tuple | None = None
    std: tuple | None = None

    def __call__(self, x):
        import tensorflow as tf

        x = tf.cast(x, tf.float32)
        if self.resize is not None:
            x = tf.image.resize(x, self.resize)
        if self.scale != 1.0 or self.offset != 0.0:
            x = x * self.scale + self.offset
        if self.mean is not None:
            x = x - tf.constant(self.mean, tf.float32)
        if self.std is not None:
            x = x / tf.constant(self.std, tf.float32)
        return x


PRESETS = {
    # Pixels 0..255 -> 0..1 (most Keras models trained on scaled images).
    "rescale": Preprocess("rescale", scale=1 / 255),
    # Pixels -> -1..1 (MobileNet v1/v2, Inception, Xception).
    "mobilenet": Preprocess("mobilenet", scale=1 / 127.5, offset=-1.0),
    # Pixels -> 0..1, then ImageNet mean/std per channel (torchvision-style models).
    "imagenet": Preprocess("imagenet", scale=1 / 255, mean=(0.485, 0.456, 0.406),
                           std=(0.229, 0.224, 0.225)),
    # Pixels as floats, untouched (models that normalise inside, like EfficientNet and
    # MobileNetV3 in keras.applications).
    "cast": Preprocess("cast"),
}


def preset(name: str, resize: tuple[int, int] | None = None) -> Preprocess:
    """A named preset (``rescale``, ``mobilenet``, ``imagenet``, ``cast``), optionally resizing.

    Example:
        >>> preset("rescale", resize=(32, 32)).resize
        (32, 32)
        >>> preset("vgg")
        Traceback (most recent call last):
        ...
        ValueError: no preprocessing preset 'vgg'; presets: rescale, mobilenet, imagenet, cast.
    """
    if name not in PRESETS:
        raise ValueError(f"no preprocessing preset {name!r}; presets: {', '.join(PRESETS)}.")
    p = PRESETS[name]
    return dataclasses.replace(p, resize=tuple(resize)) if resize else p
