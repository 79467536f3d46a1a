"""Benchmark: our Mask R-CNN's size, FLOPs and CPU training-step time vs tf-models-official's.

Exact command (from the repository root)::

    .venv/bin/python benchmarks/bench_model.py --steps 5 --repeats 3

What it reports, as Markdown:

1. parameters of our R-50-FPN Mask R-CNN (`build_maskrcnn_model` defaults, 81 classes), total and
   trainable (frozen stem + res2 and frozen BN are not trainable), after one dummy forward;
2. forward FLOPs per image of the inference forward at 800x1344 (batch 1), from TensorFlow's
   profiler (`tf.compat.v1.profiler.profile(graph, float_operation())`) on the graph of a
   concrete function: ops with registered flop statistics only (Conv2D / MatMul count
   2 x multiply-adds; element-wise ops one flop per element; NMS, ROIAlign gathers and
   resizes are not counted);
3. CPU training-step seconds at 512x512 (`--size`, or `--height` x `--width`), batch 2, fp32,
   ours vs Model Garden's Mask R-CNN (built by `official.vision.modeling.factory.build_maskrcnn`
   from the `maskrcnn_resnetfpn_coco` experiment config, set to our ROI / RPN / proposal
   numbers). A train step is forward + loss + gradients +
   `tf_keras.optimizers.SGD(0.0, momentum=0.9)` apply, in one `tf.function`, with and without
   `jit_compile`. Inputs are synthetic (random images, a few random gt boxes
   with random masks per image); Model Garden's anchor targets come from its own
   `official.vision.ops.anchor.RpnAnchorLabeler`, built outside the timed step. Each variant
   is compiled by one untimed call (the compile time reported), then `--steps` steps are timed
   per repeat, variants interleaved (order reversed on odd repeats); medians over repeats.
   Both models are initialised from a fixed seed and trained at learning rate 0: every step
   does the whole work of an update (gradients, momentum, assignment) while the weights stay
   at their initialisation, so every timed step sees the same proposals, NMS and sampling work.
   (At rate 0.01 our randomly initialised frozen-BN model reaches NaN within 3 steps, and the
   data-dependent ops of a NaN model do no representative work.)
"""

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
import traceback

import numpy as np
from machine import cpu_model, package_version

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 81
MAX_INSTANCES = 100
MASK_CROP = 112
FLOPS_HEIGHT, FLOPS_WIDTH = 800, 1344
# Weights initialised from this seed, trained at rate 0 (see the module docstring).
INIT_SEED = 0
LEARNING_RATE = 0.0
SETTINGS = {
    "roi_num_samples": 512,
    "roi_fg_fraction": 0.25,
    "rpn_batch_size_per_image": 256,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 1000,
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="square training image side")
    parser.add_argument("--height", type=int, help="training image height (default --size)")
    parser.add_argument("--width", type=int, help="training image width (default --size)")
    parser.add_argument("--num_gt", type=int, default=5, help="gt boxes per image")
    parser.add_argument("--skip_flops", action="store_true")
    parser.add_argument("--skip_mg", action="store_true", help="time ours only")
    parser.add_argument("--no_xla", action="store_true", help="skip the jit_compile variants")
    parser.add_argument("--xla_only", action="store_true",
                        help="only the jit_compile variants (at 800x1344 both kinds of every "
                        "model in one process need more memory than 24 GiB)")
    parser.add_argument("--full_mask_slots", action="store_true",
                        help="also time ours with the mask head on all 128 slots per image "
                             "(mask_slot_buckets = 1), as Model Garden's")
    parser.add_argument("--grappler_memory_optimizer", choices=("off", "on"), default="off",
                        help="TensorFlow's Grappler memory optimizer for every variant: off as "
                             "training runs (`run.grappler_memory_optimizer`), on as "
                             "TensorFlow's default")
    args = parser.parse_args(argv)
    args.height = args.size if args.height is None else args.height
    args.width = args.size if args.width is None else args.width
    return args


# ------------------------------------------------------------------ machine


def machine_line():
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Machine ({date}): {cpu_model()}, {os.cpu_count()} cores "
            f"({len(os.sched_getaffinity(0))} usable), Linux {platform.release()}; Python "
            f"{platform.python_version()}, tensorflow {package_version('tensorflow')}, tf-keras "
            f"{package_version('tf-keras')}, tf-models-official "
            f"{package_version('tf-models-official')}; tf.config.threading defaults.")


# ------------------------------------------------------------------ synthetic data


def synthetic_batch(batch, size, num_gt, seed=0, width=None):
    """Random images of size x width (width: default size), num_gt random boxes per image with
    random binary masks (numpy)."""
    width = size if width is None else width
    rng = np.random.default_rng(seed)
    images = rng.uniform(-2.0, 2.0, (batch, size, width, 3)).astype(np.float32)
    boxes = -np.ones((batch, MAX_INSTANCES, 4), np.float32)
    classes = -np.ones((batch, MAX_INSTANCES), np.int32)
    masks = -np.ones((batch, MAX_INSTANCES, MASK_CROP, MASK_CROP), np.float32)
    for b in range(batch):
        for i in range(num_gt):
            h, w = rng.uniform(0.15, 0.6, 2) * (size, width)
            y0, x0 = rng.uniform(0, size - h), rng.uniform(0, width - w)
            boxes[b, i] = (y0, x0, y0 + h, x0 + w)
            classes[b, i] = rng.integers(1, NUM_CLASSES)
            masks[b, i] = (rng.uniform(size=(MASK_CROP, MASK_CROP)) > 0.5).astype(np.float32)
    image_size = np.tile(np.array([[size, width]], np.int32), (batch, 1))
    # The boxes are drawn as continuous corners, so each mask crop's extent is its box.
    return {"images": images, "image_size": image_size, "gt_boxes": boxes,
            "gt_classes": classes, "gt_masks": masks, "gt_mask_boxes": boxes.copy()}


# ------------------------------------------------------------------ our model


def build_ours(**settings):
    """Our model with its variables created right after seeding, so that every variant built
    by this script starts from the same weights."""
    import tf_keras

    from official_maskrcnn import runtime
    from official_maskrcnn.modeling import factory

    tf_keras.utils.set_random_seed(INIT_SEED)
    model = factory.build_maskrcnn_model(num_classes=NUM_CLASSES, **SETTINGS, **settings)
    model(runtime.dummy_training_inputs(), training=True)
    return model


def ours_inputs(data):
    """Our model's inputs from a `synthetic_batch`, with a fixed sampling seed."""
    import tensorflow as tf

    inputs = {k: tf.constant(v) for k, v in data.items()}
    inputs["seed"] = tf.constant([1, 2], tf.int32)
    return inputs


def mask_slots_used(inputs):
    """How many mask ROI slots per image our mask head runs on for `inputs` (the bucket that
    holds the batch's foreground ROIs), read from its eager input shape."""
    model = build_ours()
    shapes = []
    call = model.mask_head.call
    model.mask_head.call = lambda x: shapes.append(x.shape[1]) or call(x)
    model(inputs, training=True)
    return shapes[0]


def count_params(model):
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    return total, trainable


def ours_params():
    return count_params(build_ours())  # built: every variable exists


def inference_flops():
    """Profiler float ops of our inference forward at 800x1344, batch 1 (see the docstring)."""
    import tensorflow as tf

    model = build_ours()  # built: tracing the inference creates no variable
    spec = {"images": tf.TensorSpec([1, FLOPS_HEIGHT, FLOPS_WIDTH, 3], tf.float32),
            "image_size": tf.TensorSpec([1, 2], tf.int32)}
    concrete = tf.function(lambda inputs: model(inputs, training=False)).get_concrete_function(
        spec)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    prof = tf.compat.v1.profiler.profile(concrete.graph, options=options)
    return prof.total_float_ops


# ------------------------------------------------------------------ Model Garden model


def mg_config(height, width):
    from official.core import exp_factory

    config = exp_factory.get_exp_config("maskrcnn_resnetfpn_coco")
    model = config.task.model
    model.num_classes = NUM_CLASSES
    model.input_size = [height, width, 3]
    model.norm_activation.use_sync_bn = False
    model.roi_sampler.num_sampled_rois = SETTINGS["roi_num_samples"]
    model.roi_sampler.foreground_fraction = SETTINGS["roi_fg_fraction"]
    model.roi_generator.pre_nms_top_k = SETTINGS["rpn_pre_nms_top_n_train"]
    model.roi_generator.num_proposals = SETTINGS["rpn_post_nms_top_n_train"]
    model.mask_sampler.num_sampled_masks = int(
        SETTINGS["roi_num_samples"] * SETTINGS["roi_fg_fraction"])
    config.task.train_data.parser.rpn_batch_size_per_im = SETTINGS["rpn_batch_size_per_image"]
    config.task.losses.l2_weight_decay = 0.0
    return config


def build_mg(config):
    import tensorflow as tf
    import tf_keras
    from official.vision.modeling import factory

    tf_keras.utils.set_random_seed(INIT_SEED)
    size = config.task.model.input_size
    model = factory.build_maskrcnn(input_specs=tf_keras.layers.InputSpec(shape=[None] + size),
                                   model_config=config.task.model, l2_regularizer=None)
    model(tf.zeros([1] + size), image_shape=tf.constant([size[:2]], tf.float32), training=False)
    return model


def mg_labels(config, data):
    """Model Garden's anchors and RPN targets for the synthetic batch (its own labeler)."""
    import tensorflow as tf
    from official.vision.ops import anchor

    model_cfg = config.task.model
    parser_cfg = config.task.train_data.parser
    size = model_cfg.input_size[:2]
    anchor_boxes = anchor.build_anchor_generator(
        min_level=model_cfg.min_level, max_level=model_cfg.max_level,
        num_scales=model_cfg.anchor.num_scales, aspect_ratios=model_cfg.anchor.aspect_ratios,
        anchor_size=model_cfg.anchor.anchor_size)(image_size=size)
    labeler = anchor.RpnAnchorLabeler(parser_cfg.rpn_match_threshold,
                                      parser_cfg.rpn_unmatched_threshold,
                                      parser_cfg.rpn_batch_size_per_im,
                                      parser_cfg.rpn_fg_fraction)
    scores, boxes = [], []
    for b in range(data["images"].shape[0]):
        valid = data["gt_classes"][b] >= 0
        gt_boxes = tf.constant(data["gt_boxes"][b][valid])
        gt_classes = tf.constant(data["gt_classes"][b][valid][:, None], tf.float32)
        score, box = labeler.label_anchors(anchor_boxes, gt_boxes, gt_classes)
        scores.append(score)
        boxes.append(box)
    batch = data["images"].shape[0]
    stack = lambda dicts: {k: tf.stack([d[k] for d in dicts]) for k in dicts[0]}  # noqa: E731
    image_info = np.tile(np.array([[size, size, [1.0, 1.0], [0.0, 0.0]]], np.float32),
                         [batch, 1, 1])
    return {
        "anchor_boxes": {k: tf.tile(v[None], [batch, 1, 1, 1]) for k, v in anchor_boxes.items()},
        "image_info": tf.constant(image_info),
        "rpn_score_targets": stack(scores),
        "rpn_box_targets": stack(boxes),
        "gt_boxes": tf.constant(data["gt_boxes"]),
        "gt_classes": tf.constant(data["gt_classes"]),
        "gt_masks": tf.constant(data["gt_masks"]),
    }


# ------------------------------------------------------------------ train steps


def sgd():
    import tf_keras

    return tf_keras.optimizers.SGD(LEARNING_RATE, momentum=0.9)


def ours_step_fn(model, jit):
    import tensorflow as tf

    optimizer = sgd()

    @tf.function(jit_compile=jit)
    def step(inputs):
        with tf.GradientTape() as tape:
            loss = model(inputs, training=True)["total_loss"]
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step


def mg_step_fn(model, task, jit):
    import tensorflow as tf

    optimizer = sgd()

    @tf.function(jit_compile=jit)
    def step(inputs):
        images, labels = inputs
        with tf.GradientTape() as tape:
            outputs = model(images, image_shape=labels["image_info"][:, 1, :],
                            anchor_boxes=labels["anchor_boxes"], gt_boxes=labels["gt_boxes"],
                            gt_classes=labels["gt_classes"], gt_masks=labels["gt_masks"],
                            training=True)
            outputs = tf.nest.map_structure(lambda x: tf.cast(x, tf.float32), outputs)
            loss = task.build_losses(outputs, labels, aux_losses=model.losses)["total_loss"]
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step


def make_variants(args):
    """[(name, step, inputs)] for ours and Model Garden, eager/XLA."""
    import tensorflow as tf
    from official.vision.tasks import maskrcnn as mg_task

    data = synthetic_batch(args.batch, args.height, args.num_gt, width=args.width)
    inputs = ours_inputs(data)
    jits = (False,) if args.no_xla else (True,) if args.xla_only else (False, True)
    variants = []
    for jit in jits:
        step = ours_step_fn(build_ours(), jit)
        variants.append({"name": f"ours, jit_compile={jit}", "step": step, "inputs": inputs})
        if args.full_mask_slots:
            step = ours_step_fn(build_ours(mask_slot_buckets=1), jit)
            variants.append({"name": f"ours, all mask slots, jit_compile={jit}", "step": step,
                             "inputs": inputs})
    if not args.skip_mg:
        config = mg_config(args.height, args.width)
        task = mg_task.MaskRCNNTask(config.task)
        mg_inputs = (tf.constant(data["images"]), mg_labels(config, data))
        for jit in jits:
            step = mg_step_fn(build_mg(config), task, jit)
            variants.append({"name": f"Model Garden, jit_compile={jit}", "step": step,
                             "inputs": mg_inputs})
    return variants


def compile_variant(variant):
    start = time.perf_counter()
    try:
        loss = float(variant["step"](variant["inputs"]))
    except Exception as err:  # noqa: BLE001 -- reported, the other variants still run
        variant["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        traceback.print_exc(file=sys.stderr)
        return
    variant["compile_s"] = time.perf_counter() - start
    variant["first_loss"] = loss
    variant["times"] = []


def time_variant(variant, steps):
    start = time.perf_counter()
    for _ in range(steps):
        loss = variant["step"](variant["inputs"])
    float(loss)
    variant["times"].append((time.perf_counter() - start) / steps)


def run_all(variants, args):
    for variant in variants:
        compile_variant(variant)
        print(f"# compiled {variant['name']}: {variant.get('compile_s', variant.get('error'))}",
              file=sys.stderr, flush=True)
    ok = [v for v in variants if "error" not in v]
    for repeat in range(args.repeats):
        for variant in ok if repeat % 2 == 0 else ok[::-1]:
            time_variant(variant, args.steps)
            print(f"# repeat {repeat} {variant['name']}: {variant['times'][-1]:.3f} s/step",
                  file=sys.stderr, flush=True)


# ------------------------------------------------------------------ report


def median(variant):
    return statistics.median(variant["times"]) if variant.get("times") else None


def ratio_lines(variants):
    """MG / ours s/step for matching jit settings and best-of each (> 1: ours faster)."""
    by_name = {v["name"]: median(v) for v in variants}
    lines = []
    for jit in (False, True):
        mg = by_name.get(f"Model Garden, jit_compile={jit}")
        for variant in ("ours", "ours, all mask slots"):
            ours = by_name.get(f"{variant}, jit_compile={jit}")
            if ours and mg:
                lines.append(f"| {variant} vs MG, jit_compile={jit} (both) | {ours:.3f} | "
                             f"{mg:.3f} | {mg / ours:.2f} |")
    ours_best = [s for n, s in by_name.items() if n.startswith("ours") and s]
    mg_best = [s for n, s in by_name.items() if n.startswith("Model") and s]
    if ours_best and mg_best:
        ours, mg = min(ours_best), min(mg_best)
        lines.append(f"| best of each | {ours:.3f} | {mg:.3f} | {mg / ours:.2f} |")
    return lines


def step_table(variants, args):
    lines = [
        f"CPU training step, {args.height}x{args.width}, batch {args.batch}, fp32, {args.num_gt} "
        f"random gt boxes + masks per image; {args.steps} timed steps per repeat, median of "
        f"{args.repeats} interleaved repeats; compile = first (untimed) call incl. tracing.",
        "",
        "| variant | s/step (median) | s/step (all repeats) | compile s | first loss |",
        "|---|---:|---|---:|---:|",
    ]
    for v in variants:
        if "error" in v:
            lines.append(f"| {v['name']} | failed | `{v['error']}` | - | - |")
            continue
        runs = ", ".join(f"{t:.3f}" for t in v["times"])
        lines.append(f"| {v['name']} | {median(v):.3f} | {runs} | {v['compile_s']:.1f} "
                     f"| {v['first_loss']:.3f} |")
    ratios = ratio_lines(variants)
    if ratios:
        lines += ["", "Ratio Model Garden / ours of s/step (> 1: ours faster):", "",
                  "| comparison | ours s/step | MG s/step | MG / ours |", "|---|---:|---:|---:|",
                  *ratios]
    return lines


SETTING_NOTES = (
    "Same in both: ResNet-50-FPN P2..P6, 3 anchors/location (sizes 32..512, ratios 0.5/1/2), 81 "
    "classes, RPN 256 anchors/image at 50% fg (IoU 0.7/0.3), RPN NMS 0.7, 2000 pre-NMS candidates"
    " per level per image, 1000 proposals per image, 512 sampled ROIs/image at 25% fg (IoU 0.5) "
    "with the gt boxes added, 2x1024 fc box head, 4x256 conv mask head with 28x28 output (up to "
    "128 mask ROIs/image), ROIAlign 7x7 / 14x14, SGD(0.0, momentum 0.9) from seeded weights, no "
    "weight decay (MG `l2_weight_decay=0`, l2_regularizer None), fp32, random init.",
    "Differences: (a) MG's RPN anchor targets are built by its `RpnAnchorLabeler` outside the "
    "timed step (its input pipeline does that), ours inside the step, so ours' step does more "
    "work; (b) MG's backbone has trainable batch-norm (batch statistics, `use_sync_bn=False`, "
    "momentum 0.997) and no frozen stem / res2, ours frozen BN (per-channel scale + bias) and "
    "frozen stem + res2, so MG computes more weight gradients and BN work; (c) proposals: both "
    "keep 2000 per level before NMS and 1000 per level after, then the top 1000 per image, min "
    "size 0, but MG uses its padded sorted NMS, ours our own; (d) MG's ROI sampler draws "
    "background from IoU [0, 0.5) and MG's ROIAligner uses its own sampling (`sample_offset` "
    "0.5), ours sampling_ratio 2; (e) MG samples ROIs / anchors with its own random ops, ours "
    "with stateless seeded ops; the losses (smooth-L1 / Huber variants, normalisations) follow "
    "each implementation, so first-step losses are not comparable (ours is larger from random "
    "init, plausibly because frozen BN does not normalise the activations).",
)


def report(args, argv, params, flops, variants, mask_slots):
    lines = ["### Mask R-CNN R-50-FPN: size, FLOPs, CPU train step (ours vs tf-models-official)",
             "", machine_line(), ""]
    total, trainable = params
    lines += [f"Parameters (ours, `build_maskrcnn_model` defaults, {NUM_CLASSES} classes, built "
              f"on a dummy forward): total {total:,} ({total / 1e6:.2f} M), trainable "
              f"{trainable:,} ({trainable / 1e6:.2f} M); non-trainable {total - trainable:,} "
              "(frozen stem + res2, frozen BN statistics and affine).", ""]
    if flops is not None:
        lines += [f"Inference forward FLOPs per image at {FLOPS_HEIGHT}x{FLOPS_WIDTH} (batch 1; "
                  "TF profiler `float_operation()` on the concrete-function graph, counting ops "
                  "with registered flop stats: conv / matmul = 2 x MACs, plus element-wise ops; "
                  "NMS and ROIAlign gathers not counted; 1000 proposals into the box head, 100 "
                  f"detections into the mask head): {flops:,} ({flops / 1e9:.1f} GFLOPs).", ""]
    lines += step_table(variants, args)
    lines += ["", f"Our mask head ran on {mask_slots} of its 128 ROI slots per image on this batch "
              "(the smallest `mask_slot_buckets` size holding its foreground ROIs; Model Garden "
              "always runs 128); `ours, all mask slots` is ours with `mask_slot_buckets = 1`."]
    lines += ["", *(f"{note}\n" for note in SETTING_NOTES)]
    lines += ["Command (cwd = repository root):", "", "```sh",
              shlex.join([".venv/bin/python", "benchmarks/bench_model.py", *argv]), "```"]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    sys.path.insert(0, REPO_ROOT)
    from official_maskrcnn import runtime
    runtime.set_graph_rewrites(runtime.RunSettings(
        grappler_memory_optimizer=args.grappler_memory_optimizer == "on"))
    params = ours_params()
    flops = None
    if not args.skip_flops:
        start = time.perf_counter()
        try:
            flops = inference_flops()
        except Exception:  # noqa: BLE001 -- the FLOPs line is then left out
            traceback.print_exc(file=sys.stderr)
        print(f"# flops in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    variants = make_variants(args)
    mask_slots = mask_slots_used(variants[0]["inputs"])
    run_all(variants, args)
    print(report(args, argv, params, flops, variants, mask_slots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
