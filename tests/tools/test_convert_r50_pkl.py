"""Tests for official_maskrcnn.tools.convert_r50_pkl against an independent numpy ResNet-50.

The fake pickle uses Detectron's real R-50 blob names and shapes; the numpy forward pass below
implements the reference (Caffe2 / maskrcnn-benchmark, STRIDE_IN_1X1) straight from its
definition, reading the blobs by name, without using any of our modeling code.
"""

import os
import pickle
import tempfile

import numpy as np
import tensorflow as tf

from official_maskrcnn.modeling.backbones import checkpoint
from official_maskrcnn.modeling.backbones.resnet import ResNet
from official_maskrcnn.tools import convert_r50_pkl

# ResNet-50: (stage, blocks, width) for res2..res5; bottleneck output is 4 * width.
R50_STAGES = ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512))


def _fake_r50_blobs(seed=0):
    """{name: float32 array} with Detectron R-50.pkl's names and shapes, small random values.

    Conv weights are He-scaled so activations stay O(1); the last BN of each residual branch
    has a small scale so the 16 residual additions do not blow up.
    """
    rng = np.random.default_rng(seed)
    blobs = {}

    def conv(name, out_c, in_c, k):
        std = np.sqrt(2.0 / (in_c * k * k))
        blobs[f"{name}_w"] = (rng.standard_normal([out_c, in_c, k, k]) * std).astype(np.float32)
        blobs[f"{name}_w_momentum"] = np.zeros([out_c, in_c, k, k], np.float32)

    def bn(name, c, low=0.5, high=1.0):
        blobs[f"{name}_s"] = rng.uniform(low, high, [c]).astype(np.float32)
        blobs[f"{name}_b"] = (rng.standard_normal([c]) * 0.1).astype(np.float32)

    conv("conv1", 64, 3, 7)
    bn("res_conv1_bn", 64)
    in_c = 64
    for stage, num_blocks, width in R50_STAGES:
        for i in range(num_blocks):
            prefix = f"res{stage}_{i}"
            conv(f"{prefix}_branch2a", width, in_c, 1)
            bn(f"{prefix}_branch2a_bn", width)
            conv(f"{prefix}_branch2b", width, width, 3)
            bn(f"{prefix}_branch2b_bn", width)
            conv(f"{prefix}_branch2c", 4 * width, width, 1)
            bn(f"{prefix}_branch2c_bn", 4 * width, 0.1, 0.3)
            if i == 0:
                conv(f"{prefix}_branch1", 4 * width, in_c, 1)
                bn(f"{prefix}_branch1_bn", 4 * width)
            in_c = 4 * width
    blobs["fc1000_w"] = rng.standard_normal([1000, 2048]).astype(np.float32)
    blobs["fc1000_b"] = np.zeros([1000], np.float32)
    return blobs


def _np_conv(x, w, stride, pad):
    """Torch-style conv2d: x [H, W, Cin], w [Cout, Cin, kh, kw], symmetric zero pad, no bias."""
    kh, kw = w.shape[2:]
    xp = np.pad(x, [(pad, pad), (pad, pad), (0, 0)])
    # im2col: [H', W', Cin, kh, kw] windows, strided.
    cols = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(0, 1))
    cols = cols[::stride, ::stride]
    return np.tensordot(cols, w, axes=([2, 3, 4], [1, 2, 3]))


def _np_max_pool_3x3_s2_p1(x):
    """Torch MaxPool2d(3, 2, padding=1): padding is -inf, never the max."""
    xp = np.pad(x, [(1, 1), (1, 1), (0, 0)], constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(0, 1))[::2, ::2]
    return windows.max(axis=(3, 4))


def _np_r50(image, blobs, dtype=np.float64):
    """Reference forward pass: image [H, W, 3] -> {"2".."5": [H_l, W_l, C_l]} in `dtype`."""
    b = {k: v.astype(dtype) for k, v in blobs.items() if k.endswith(("_w", "_s", "_b"))}

    def conv_bn(x, name, stride, pad, bn_name):
        y = _np_conv(x, b[f"{name}_w"], stride, pad)
        return y * b[f"{bn_name}_s"] + b[f"{bn_name}_b"]

    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    x = relu(conv_bn(image.astype(dtype), "conv1", 2, 3, "res_conv1_bn"))
    x = _np_max_pool_3x3_s2_p1(x)
    outputs = {}
    for stage, num_blocks, _ in R50_STAGES:
        for i in range(num_blocks):
            p = f"res{stage}_{i}"
            stride = 2 if (i == 0 and stage > 2) else 1
            # MSRA: the stride is on the first 1x1 conv.
            y = relu(conv_bn(x, f"{p}_branch2a", stride, 0, f"{p}_branch2a_bn"))
            y = relu(conv_bn(y, f"{p}_branch2b", 1, 1, f"{p}_branch2b_bn"))
            y = conv_bn(y, f"{p}_branch2c", 1, 0, f"{p}_branch2c_bn")
            shortcut = conv_bn(x, f"{p}_branch1", stride, 0, f"{p}_branch1_bn") if i == 0 else x
            x = relu(y + shortcut)
        outputs[str(stage)] = x
    return outputs


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


class ConvertR50PklTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.blobs = _fake_r50_blobs()
        cls.pkl = os.path.join(cls.tmp, "R-50.pkl")
        # Detectron's model pickles nest the blobs under "blobs".
        _write_pickle(cls.pkl, {"blobs": cls.blobs})
        cls.prefix = os.path.join(cls.tmp, "ckpt", "r50")
        cls.report = convert_r50_pkl.convert(cls.pkl, cls.prefix)

    def test_report_counts_every_blob(self):
        report = self.report
        self.assertEqual(report["unused"], ["fc1000_b", "fc1000_w"])
        self.assertLen(report["momentum"], 53)  # one per conv of R-50
        self.assertLen(report["assigned"], 53 + 2 * 53)  # conv kernels + bn scale and bias
        self.assertEqual(
            len(report["assigned"]) + len(report["momentum"]) + len(report["unused"]),
            len(self.blobs))
        self.assertTrue(tf.io.gfile.exists(self.prefix + ".index"))

    def test_converted_backbone_matches_numpy_reference(self):
        model = ResNet(depth=50, norm="frozen_bn")
        checkpoint.load_backbone_checkpoint(model, self.prefix)
        # Odd feature sizes (72x104 -> 18x26 -> ... -> 3x4) exercise the symmetric padding.
        image = np.random.default_rng(1).uniform(-1.0, 1.0, [72, 104, 3]).astype(np.float32)
        outputs = model(image[None], training=False)
        expected = _np_r50(image, self.blobs)
        strides = {"2": 4, "3": 8, "4": 16, "5": 32}
        for level, ref in expected.items():
            got = outputs[level].numpy()[0]
            self.assertEqual(got.shape, ref.shape, f"C{level}")
            self.assertEqual(got.shape[:2], tuple(-(-s // strides[level]) for s in (72, 104)))
            scale = np.abs(ref).max()
            self.assertGreater(scale, 1e-2)  # a non-trivial comparison
            self.assertAllClose(got, ref, atol=1e-3 * scale, rtol=1e-3, msg=f"C{level}")

    def test_main_writes_checkpoint_from_flat_dict(self):
        pkl = os.path.join(self.create_tempdir().full_path, "flat.pkl")
        _write_pickle(pkl, self.blobs)  # not nested under "blobs"
        prefix = os.path.join(self.create_tempdir().full_path, "out")
        self.assertEqual(convert_r50_pkl.main(["--input", pkl, "--output", prefix]), 0)
        self.assertTrue(tf.io.gfile.exists(prefix + ".index"))

    def test_missing_blob_is_named(self):
        blobs = dict(self.blobs)
        del blobs["res4_2_branch2b_bn_s"]
        del blobs["res3_0_branch1_w"]
        model = checkpoint.build_reference_backbone()
        with self.assertRaisesRegex(convert_r50_pkl.ConversionError, "2 blob.*missing") as cm:
            convert_r50_pkl.assign_blobs(model, blobs)
        self.assertIn("res4_2_branch2b_bn_s", str(cm.exception))
        self.assertIn("res3_0_branch1_w", str(cm.exception))

    def test_shape_mismatch_is_named_and_nothing_assigned(self):
        blobs = dict(self.blobs)
        # Transposed (a [in, out, ...] layout) stride-2 first 1x1 of res3.
        blobs["res3_0_branch2a_w"] = np.zeros([256, 128, 1, 1], np.float32)
        model = checkpoint.build_reference_backbone()
        before = model.get_weights()
        with self.assertRaisesRegex(
                convert_r50_pkl.ConversionError,
                r"res3_0_branch2a_w.*\(1, 1, 256, 128\).*\(1, 1, 128, 256\)"):
            convert_r50_pkl.assign_blobs(model, blobs)
        for a, b in zip(before, model.get_weights()):
            self.assertAllEqual(a, b)

    def test_bad_conv_rank_is_named(self):
        blobs = dict(self.blobs)
        blobs["conv1_w"] = np.zeros([64, 3, 7], np.float32)
        with self.assertRaisesRegex(convert_r50_pkl.ConversionError, "conv1_w.*4-d"):
            convert_r50_pkl.assign_blobs(checkpoint.build_reference_backbone(), blobs)

    def test_unreadable_and_wrong_files(self):
        tmp = self.create_tempdir().full_path
        garbage = os.path.join(tmp, "garbage.pkl")
        with open(garbage, "wb") as f:
            f.write(b"this is not a pickle")
        not_dict = os.path.join(tmp, "list.pkl")
        _write_pickle(not_dict, [1, 2, 3])
        with self.assertRaisesRegex(convert_r50_pkl.ConversionError, "garbage.pkl.*cannot read"):
            convert_r50_pkl.load_detectron_pickle(garbage)
        with self.assertRaisesRegex(convert_r50_pkl.ConversionError, "nope.pkl.*cannot read"):
            convert_r50_pkl.load_detectron_pickle(os.path.join(tmp, "nope.pkl"))
        with self.assertRaisesRegex(convert_r50_pkl.ConversionError, "list.pkl.*dict.*list"):
            convert_r50_pkl.load_detectron_pickle(not_dict)
        self.assertEqual(
            convert_r50_pkl.main(["--input", not_dict, "--output", os.path.join(tmp, "x")]), 1)
        self.assertFalse(tf.io.gfile.exists(os.path.join(tmp, "x.index")))

    def test_missing_blob_error_names_the_file(self):
        pkl = os.path.join(self.create_tempdir().full_path, "partial.pkl")
        _write_pickle(pkl, {k: v for k, v in self.blobs.items() if not k.startswith("res5")})
        with self.assertRaisesRegex(convert_r50_pkl.ConversionError,
                                    "partial.pkl.*missing.*res5_0_branch2a_w"):
            convert_r50_pkl.convert(pkl, os.path.join(self.create_tempdir().full_path, "o"))

    def test_load_into_mismatched_backbone_fails(self):
        model = ResNet(depth=50, norm="batch_norm")  # BN variables are not in the checkpoint
        with self.assertRaisesRegex(convert_r50_pkl.ConversionError, "does not match"):
            checkpoint.load_backbone_checkpoint(model, self.prefix)

    def test_non_frozen_bn_backbone_is_rejected(self):
        model = ResNet(depth=50, norm="group_norm")
        model(tf.zeros([1, 32, 32, 3]))
        with self.assertRaisesRegex(convert_r50_pkl.ConversionError, "norm='frozen_bn'"):
            convert_r50_pkl.assign_blobs(model, self.blobs)


if __name__ == "__main__":
    tf.test.main()
