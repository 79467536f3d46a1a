"""MSRA ResNet ("ResNet v1" of Caffe2 / Detectron), the backbone of the MLPerf reference.

Shape legend: B images, H, W the input size (any size; multiples of 32 give exact strides),
C channels. Outputs are NHWC feature maps C2..C5 at strides 4, 8, 16, 32.

Reference semantics (maskrcnn-benchmark `modeling/backbone/resnet.py` with
`STRIDE_IN_1X1=True`, Detectron `modeling/ResNet.py`):
  - stem: 7x7/2 conv (64, no bias) + norm + ReLU + 3x3/2 max pool with padding 1;
  - bottleneck: 1x1 (stride s) -> 3x3 -> 1x1 (x4 channels), each conv bias-free and followed by
    the norm, ReLU after the first two and after the residual add. The stride sits on the FIRST
    1x1 conv (the MSRA weights were trained this way; torchvision's "v1.5" puts it on the 3x3);
  - the first block of every stage has a projection shortcut: 1x1 conv (stride s) + norm;
  - every conv pads symmetrically by kernel_size // 2 as torch does. TF's 'SAME' pads stride-2
    convs asymmetrically (more at the bottom/right), which would shift every feature map by a
    pixel relative to the reference weights, so we pad explicitly and convolve with 'valid'.

Layer names are Detectron's blob names without the `_w`, `_s`, `_b` suffix (`conv1`,
`res_conv1_bn`, `res2_0_branch2a`, `res2_0_branch2a_bn`, `res2_0_branch1`, ...), so that
`official_maskrcnn.tools.convert_r50_pkl` maps blobs to variables by name.
"""

import tensorflow as tf
import tf_keras

from official_maskrcnn.modeling.layers.frozen_batch_norm import FrozenBatchNorm
from official_maskrcnn.modeling.layers.pointwise_conv import PointwiseConv2D

# depth -> (block type, blocks per stage res2..res5).
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
NORMS = ("frozen_bn", "batch_norm", "group_norm")
STEM_FILTERS = 64
# Output channels of the 3x3 conv of each stage res2..res5 (the block width); bottleneck blocks
# output BOTTLENECK_EXPANSION times that.
STAGE_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
# Group norm as in Detectron's GN baselines (training from scratch): 32 groups, eps 1e-5.
GROUP_NORM_GROUPS = 32
NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9
# freeze_at counts frozen "stages" as the reference does: 1 = the stem, 2 = stem + res2, ...
FREEZE_AT_MAX = 5


def make_norm(norm, name):
    """Returns the normalisation layer `norm` (one of NORMS) named `name`."""
    if norm == "frozen_bn":
        return FrozenBatchNorm(name=name)
    if norm == "batch_norm":
        return tf_keras.layers.BatchNormalization(
            epsilon=NORM_EPSILON, momentum=BATCH_NORM_MOMENTUM, name=name)
    if norm == "group_norm":
        return tf_keras.layers.GroupNormalization(
            groups=GROUP_NORM_GROUPS, epsilon=NORM_EPSILON, name=name)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def make_conv(filters, kernel_size, strides, name):
    """A bias-free 'valid' Conv2D; the caller pads with `symmetric_pad` (torch semantics). A 1x1
    conv is a `PointwiseConv2D` (a matrix product, the same variables; faster under XLA)."""
    conv_class = PointwiseConv2D if kernel_size == 1 else tf_keras.layers.Conv2D
    return conv_class(
        filters, kernel_size, strides=strides, padding="valid", use_bias=False,
        # MSRAFill / kaiming_normal(mode='fan_out'), used when not loading pretrained weights.
        kernel_initializer=tf_keras.initializers.VarianceScaling(
            scale=2.0, mode="fan_out", distribution="untruncated_normal"),
        name=name)


def symmetric_pad(x, pad):
    """Zero-pads H and W of x [B, H, W, C] by `pad` on each side -> [B, H + 2p, W + 2p, C]."""
    if pad == 0:
        return x
    return tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])


class BottleneckBlock(tf_keras.layers.Layer):
    """MSRA bottleneck: 1x1 (stride) -> 3x3 -> 1x1 (x4), plus identity or projection shortcut.

    Sub-layers are named `{prefix}_branch2a`, `{prefix}_branch2a_bn`, ..., `{prefix}_branch1`
    (the projection shortcut, when `use_projection`) and `{prefix}_branch1_bn`.
    """

    def __init__(self, width, strides, use_projection, norm="frozen_bn", **kwargs):
        """Args:
            width: channels of the 1x1 and 3x3 convs; the block outputs 4 * width.
            strides: 1 or 2, applied by the first 1x1 conv and the projection shortcut.
            use_projection: whether the shortcut is a 1x1 conv + norm (first block of a stage).
            norm: one of NORMS.
            **kwargs: base layer arguments; `name` is the Detectron prefix, e.g. "res3_0".
        """
        super().__init__(**kwargs)
        self._config = dict(width=width, strides=strides, use_projection=use_projection, norm=norm)
        prefix = self.name
        out_filters = width * BOTTLENECK_EXPANSION
        self._conv_a = make_conv(width, 1, strides, f"{prefix}_branch2a")
        self._norm_a = make_norm(norm, f"{prefix}_branch2a_bn")
        self._conv_b = make_conv(width, 3, 1, f"{prefix}_branch2b")
        self._norm_b = make_norm(norm, f"{prefix}_branch2b_bn")
        self._conv_c = make_conv(out_filters, 1, 1, f"{prefix}_branch2c")
        self._norm_c = make_norm(norm, f"{prefix}_branch2c_bn")
        self._shortcut_conv = None
        self._shortcut_norm = None
        if use_projection:
            self._shortcut_conv = make_conv(out_filters, 1, strides, f"{prefix}_branch1")
            self._shortcut_norm = make_norm(norm, f"{prefix}_branch1_bn")

    def call(self, inputs, training=None):
        """inputs [B, H, W, Cin] -> [B, ceil(H / s), ceil(W / s), 4 * width]."""
        shortcut = inputs
        if self._shortcut_conv is not None:
            shortcut = self._shortcut_norm(self._shortcut_conv(inputs), training=training)
        x = tf.nn.relu(self._norm_a(self._conv_a(inputs), training=training))
        x = tf.nn.relu(self._norm_b(self._conv_b(symmetric_pad(x, 1)), training=training))
        x = self._norm_c(self._conv_c(x), training=training)
        return tf.nn.relu(x + shortcut)

    def get_config(self):
        return {**super().get_config(), **self._config}


class BasicBlock(tf_keras.layers.Layer):
    """Two 3x3 convs (the first strided) for ResNet-18/34, plus identity or projection shortcut.

    Not part of the MLPerf reference (Detectron has no R-18/34 weights); names follow the same
    scheme: `{prefix}_branch2a`, `{prefix}_branch2b`, `{prefix}_branch1` and their `_bn`.
    """

    def __init__(self, width, strides, use_projection, norm="frozen_bn", **kwargs):
        """Args:
            width: output channels of both 3x3 convs (and of the block).
            strides: 1 or 2, applied by the first 3x3 conv and the projection shortcut.
            use_projection: whether the shortcut is a 1x1 conv + norm.
            norm: one of NORMS.
            **kwargs: base layer arguments; `name` is the prefix, e.g. "res3_0".
        """
        super().__init__(**kwargs)
        self._config = dict(width=width, strides=strides, use_projection=use_projection, norm=norm)
        prefix = self.name
        self._conv_a = make_conv(width, 3, strides, f"{prefix}_branch2a")
        self._norm_a = make_norm(norm, f"{prefix}_branch2a_bn")
        self._conv_b = make_conv(width, 3, 1, f"{prefix}_branch2b")
        self._norm_b = make_norm(norm, f"{prefix}_branch2b_bn")
        self._shortcut_conv = None
        self._shortcut_norm = None
        if use_projection:
            self._shortcut_conv = make_conv(width, 1, strides, f"{prefix}_branch1")
            self._shortcut_norm = make_norm(norm, f"{prefix}_branch1_bn")

    def call(self, inputs, training=None):
        """inputs [B, H, W, Cin] -> [B, ceil(H / s), ceil(W / s), width]."""
        shortcut = inputs
        if self._shortcut_conv is not None:
            shortcut = self._shortcut_norm(self._shortcut_conv(inputs), training=training)
        x = tf.nn.relu(self._norm_a(self._conv_a(symmetric_pad(inputs, 1)), training=training))
        x = self._norm_b(self._conv_b(symmetric_pad(x, 1)), training=training)
        return tf.nn.relu(x + shortcut)

    def get_config(self):
        return {**super().get_config(), **self._config}


@tf_keras.utils.register_keras_serializable(package="official_maskrcnn")
class ResNet(tf_keras.Model):
    """MSRA ResNet backbone returning {"2": C2, "3": C3, "4": C4, "5": C5}.

    Input: images [B, H, W, 3] (for the Detectron weights: BGR, 0..255, mean-subtracted).
    Output: a dict of NHWC maps, "l" -> [B, H / 2**l, W / 2**l, C_l] (ceil-rounded), where C_l is
    256, 512, 1024, 2048 for depth 50/101 and 64, 128, 256, 512 for depth 18/34.
    """

    def __init__(self, depth=50, norm="frozen_bn", freeze_at=2, **kwargs):
        """Args:
            depth: 18, 34 (basic blocks), 50 or 101 (bottleneck blocks).
            norm: "frozen_bn" (Detectron's folded affine, the reference), "batch_norm", or
                "group_norm" (32 groups, for training from scratch).
            freeze_at: number of leading stages that do not train: 0 none, 1 the stem, 2 the stem
                and res2 (the reference), ... up to 5 (everything).
            **kwargs: base Model arguments (name, ...).
        """
        super().__init__(**kwargs)
        if depth not in RESNET_SPECS:
            raise ValueError(f"depth must be one of {sorted(RESNET_SPECS)}, got {depth!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not 0 <= freeze_at <= FREEZE_AT_MAX:
            raise ValueError(f"freeze_at must be in [0, {FREEZE_AT_MAX}], got {freeze_at!r}")
        self._config = dict(depth=depth, norm=norm, freeze_at=freeze_at)
        block_type, blocks_per_stage = RESNET_SPECS[depth]
        block_class = BottleneckBlock if block_type == "bottleneck" else BasicBlock
        expansion = BOTTLENECK_EXPANSION if block_type == "bottleneck" else 1

        self._stem_conv = make_conv(STEM_FILTERS, 7, 2, "conv1")
        self._stem_norm = make_norm(norm, "res_conv1_bn")
        self._stages = []
        in_channels = STEM_FILTERS
        for stage_index, (width, num_blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage)):
            level = stage_index + 2
            blocks = []
            for block_index in range(num_blocks):
                # res2 keeps the stride-4 resolution of the pooled stem; res3..res5 halve it.
                strides = 2 if (block_index == 0 and level > 2) else 1
                use_projection = block_index == 0 and (
                    strides != 1 or in_channels != width * expansion)
                blocks.append(block_class(
                    width=width, strides=strides, use_projection=use_projection, norm=norm,
                    name=f"res{level}_{block_index}"))
                in_channels = width * expansion
            self._stages.append(blocks)

        if freeze_at >= 1:
            self._stem_conv.trainable = False
            self._stem_norm.trainable = False
        for stage_index in range(freeze_at - 1):
            for block in self._stages[stage_index]:
                block.trainable = False

    @property
    def output_specs(self):
        """{"2".."5": channels} of the outputs."""
        block_type, _ = RESNET_SPECS[self._config["depth"]]
        expansion = BOTTLENECK_EXPANSION if block_type == "bottleneck" else 1
        return {str(i + 2): w * expansion for i, w in enumerate(STAGE_WIDTHS)}

    def call(self, inputs, training=None):
        """images [B, H, W, 3] -> {"2": [B, H/4, W/4, C2], ..., "5": [B, H/32, W/32, C5]}."""
        x = self._stem_conv(symmetric_pad(inputs, 3))
        x = tf.nn.relu(self._stem_norm(x, training=training))
        # torch's max pool pads with -inf so padding never wins the max; after the ReLU every
        # input is >= 0, so zero padding gives the same result.
        x = tf.nn.max_pool2d(symmetric_pad(x, 1), ksize=3, strides=2, padding="VALID")
        outputs = {}
        for stage_index, blocks in enumerate(self._stages):
            for block in blocks:
                x = block(x, training=training)
            outputs[str(stage_index + 2)] = x
        return outputs

    def get_config(self):
        return {"name": self.name, **self._config}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)
