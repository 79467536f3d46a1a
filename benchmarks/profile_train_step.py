"""Profile: where our training step spends its time, and how much sequential loop work it has.

Exact command (from the repository root)::

    .venv/bin/python benchmarks/profile_train_step.py --height 512 --width 512
    .venv/bin/python benchmarks/profile_train_step.py --height 800 --width 1344 --steps 2

The step is the one `benchmarks/bench_model.py` times (our R-50-FPN Mask R-CNN, 81 classes,
its synthetic batch: random images and `--num_gt` random boxes with masks per image; forward,
losses, gradients and an SGD update in one `tf.function`). It reports, as Markdown:

1. s/step with and without XLA (medians of `--steps` steps after two warm-up steps);
2. without XLA, from a `tf.profiler` trace of `--steps` steps: the op time of every stage of the
   model (the name scopes of `MaskRCNNModel`: backbone, FPN, heads, RPN targets, proposals,
   ROI sampling, ROIAlign, mask targets, losses; `gradient_tape/` ops are the backward pass of
   their stage, reported separately) and the op types with the largest share. Op time is the
   sum of kernel durations over both executor threads, so the shares are of the work done, not
   of wall time;
3. the sequential work: every `tf.while_loop` the step runs, with its trip count per step
   (measured: executions of its body's ops in the trace, divided by the steps), and the `while`
   instructions of the XLA-compiled step's HLO (`experimental_get_compiler_ir`);
4. with XLA, from a trace of the compiled step: the time of the HLO instructions XLA:CPU's
   thunk executor traces (fusions, copies, reduce-windows, sorts, ...), by model stage (each
   instruction mapped to the TensorFlow op in its metadata) and by instruction kind.
   Convolutions and matrix products run as asynchronous Eigen tasks whose events only cover
   their dispatch, so their time is in the untraced remainder the report states.
"""

import argparse
import collections
import glob
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

from bench_model import NUM_CLASSES, build_ours, ours_inputs, ours_step_fn, synthetic_batch
from machine import cpu_model, package_version

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# "<loop prefix>/body/_<n>/<op name>": an op of a tf.while_loop body, as the executor names it.
BODY = re.compile(r"^(.*)/body/_\d+/(.*)$")
COND = re.compile(r"/cond/_\d+/")
BACKWARD = "gradient_tape/"
MODEL = "maskrcnn/"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num_gt", type=int, default=5, help="gt boxes per image")
    parser.add_argument("--steps", type=int, default=3, help="timed (and profiled) steps")
    parser.add_argument("--top", type=int, default=15, help="op types listed")
    parser.add_argument("--no_xla", action="store_true", help="skip the XLA step")
    return parser.parse_args(argv)


def make_inputs(args):
    data = synthetic_batch(args.batch, max(args.height, args.width), args.num_gt)
    # Crop the square synthetic batch to height x width; boxes are clipped into the crop.
    data["images"] = data["images"][:, :args.height, :args.width]
    data["image_size"][:] = (args.height, args.width)
    for key in ("gt_boxes", "gt_mask_boxes"):
        boxes = data[key]
        real = boxes[..., 0] >= 0
        limit = [args.height - 1, args.width - 1, args.height - 1, args.width - 1]
        boxes[real] = boxes[real].clip(0, limit)
    return ours_inputs(data)


def time_steps(step, inputs, steps):
    for _ in range(2):  # tracing / compilation, then one warm step
        float(step(inputs))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        float(step(inputs))
        times.append(time.perf_counter() - start)
    return times


def _trace(step, inputs, steps):
    """The tf.profiler XSpace of `steps` calls of `step`."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="profile_train_step_")
    try:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            float(step(inputs))
        tf.profiler.experimental.stop()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as handle:
            space.ParseFromString(handle.read())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return space


def _compute_lines(space, prefix):
    """(plane, line) of the host lines whose name starts with `prefix`."""
    for plane in space.planes:
        if plane.name == "/host:CPU":
            for line in plane.lines:
                if line.name.startswith(prefix):
                    yield plane, line


def trace_events(step, inputs, steps):
    """[(op name, op type, seconds)] of the kernels run by `steps` steps under tf.profiler."""
    events = []
    # The executor threads; Eigen's pool threads carry no op names.
    for plane, line in _compute_lines(_trace(step, inputs, steps), "tf_Compute"):
        for event in line.events:
            label = plane.event_metadata[event.metadata_id].name
            if "::" in label or ":" not in label:
                continue  # executor bookkeeping, not a kernel
            name, op_type = label.rsplit(":", 1)
            events.append((name, op_type, event.duration_ps * 1e-12))
    return events


def xla_trace_events(step, inputs, steps):
    """[(HLO instruction name, self seconds)] of the XLA-compiled step's thunks under
    tf.profiler. XLA:CPU's thunk executor runs on Eigen's pool threads and traces every
    instruction it executes (fusions, copies, reduce-windows, sorts, ...) as an event named
    after the instruction; an event's self time excludes the events nested in it. Wrapper
    events (the executor itself, `call` thunks of parallelised loops) are not listed, their
    self time is scheduling."""
    events = []
    for plane, line in _compute_lines(_trace(step, inputs, steps), "tf_numa"):
        spans = sorted(((event.offset_ps, event.duration_ps,
                         plane.event_metadata[event.metadata_id].name) for event in line.events),
                       key=lambda span: (span[0], -span[1]))
        nested = [0] * len(spans)
        open_spans = []
        for index, (start, duration, _) in enumerate(spans):
            while open_spans and sum(spans[open_spans[-1]][:2]) <= start:
                open_spans.pop()
            if open_spans:
                nested[open_spans[-1]] += duration
            open_spans.append(index)
        for (_, duration, name), inner in zip(spans, nested):
            if not name.startswith(("ThunkExecutor", "call.")):
                events.append((name, (duration - inner) * 1e-12))
    return events


_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_HLO_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = ")
_HLO_CALLS = re.compile(r"(?:calls|to_apply)=%([\w.\-]+)")
_HLO_OP_NAME = re.compile(r'op_name="([^"]*)"')
_HLO_OPERAND = re.compile(r"%([\w.\-]+)")


def hlo_op_names(hlo_text):
    """{HLO instruction name: the TensorFlow op it comes from} of an optimized HLO module.
    An instruction without metadata (most fusions, and the `.clone`s of parallelised loops)
    takes the op of the last instruction with one in the computation it calls; failing that,
    the op of the instruction that calls its own computation, or of its first operand (a
    layout copy has the op of the tensor it copies)."""
    own, calls, operands, parent, caller = {}, {}, {}, {}, {}
    bodies = collections.defaultdict(list)
    computation = None
    for text in hlo_text.splitlines():
        match = _HLO_COMPUTATION.match(text)
        if match:
            computation = match.group(1)
            continue
        match = _HLO_INSTRUCTION.match(text)
        if not match:
            continue
        name = match.group(1)
        bodies[computation].append(name)
        parent[name] = computation
        op_name = _HLO_OP_NAME.search(text)
        if op_name:
            own[name] = op_name.group(1)
        calls[name] = _HLO_CALLS.findall(text)
        for called in calls[name]:
            caller.setdefault(called, name)
        arguments = text[match.end():].split("(", 1)
        operands[name] = _HLO_OPERAND.findall(arguments[1].split(")", 1)[0]) if len(
            arguments) > 1 else []

    resolved = {}

    def resolve(name, depth=0):
        if name in resolved or depth > 12:
            return resolved.get(name)
        resolved[name] = own.get(name)  # also marks the instruction as being resolved
        candidates = [inner for called in calls.get(name, ())
                      for inner in reversed(bodies.get(called, ()))]
        candidates += [caller[parent[name]]] if parent.get(name) in caller else []
        candidates += operands.get(name, [])[:1]
        for candidate in candidates if resolved[name] is None else ():
            if resolve(candidate, depth + 1):
                resolved[name] = resolved[candidate]
                break
        return resolved[name]

    return {name: resolve(name) for name in calls}


def hlo_kind(name):
    """'transpose_copy_fusion.3.clone' -> 'transpose_copy_fusion'."""
    return re.sub(r"(\.clone|\.\d+)+$", "", name)


def stage_of(name, stages):
    """The stage of an op: the innermost of its name's scopes that is a stage of the model (a
    layer or a `MaskRCNNModel.STAGE_SCOPES` scope; an op inside a loop body or a branch has
    the scopes of the loop too), with ' (backward)' for the gradient ops of that stage."""
    backward = name.startswith(BACKWARD)
    if backward:
        name = name[len(BACKWARD):]
    known = [part for part in name.split("/")[:-1] if part in stages]
    if known:
        stage = known[-1]
    elif name.startswith(MODEL):
        stage = "model (unscoped ops)"
    elif name.startswith("SGD/"):
        stage = "optimizer"
    else:
        stage = "other (grappler's fused ops, inputs)"
    return stage + (" (backward)" if backward else "")


def loop_trip_counts(events, steps):
    """{loop prefix: iterations per step}: the most executed op of each loop body."""
    per_op = collections.Counter(name for name, _, _ in events)
    loops = collections.defaultdict(int)
    for name, count in per_op.items():
        match = BODY.match(name)
        # Ops directly in a body; an inner loop's condition (".../cond/_<n>/...") runs once
        # more than its body per entry and belongs to the inner loop.
        if match and not COND.search(match.group(2)):
            loops[match.group(1)] = max(loops[match.group(1)], count)
    return {loop: count / steps for loop, count in sorted(loops.items())}


def hlo_while_count(step, inputs):
    hlo = step.experimental_get_compiler_ir(inputs)(stage="hlo")
    return len(re.findall(r"\bwhile\(", hlo))


def xla_report(args, xla_times, xla_events, op_names, stages):
    """Markdown lines: where the XLA step's traced time goes, by stage and by HLO kind."""
    traced = sum(seconds for _, seconds in xla_events)
    wall = statistics.median(xla_times)
    threads = len(os.sched_getaffinity(0))
    by_stage, by_kind, by_instruction = (collections.Counter() for _ in range(3))
    for name, seconds in xla_events:
        op_name = op_names.get(name)
        by_stage[stage_of(op_name, stages) if op_name else "(no TF op)"] += seconds
        by_kind[hlo_kind(name)] += seconds
        by_instruction[name, op_name] += seconds
    steps = args.steps
    lines = ["", f"XLA step, traced HLO instructions: {traced / steps:.2f} s per step of the "
             f"{wall:.2f} s wall x {threads} threads = {wall * threads:.2f} thread-s. The rest "
             "is work XLA:CPU hands to Eigen as tasks without trace events (convolutions and "
             "matrix products run asynchronously; their events only cover the dispatch) and "
             "idle threads.", "", "| stage (XLA) | traced s / step | share of traced |",
             "|---|---:|---:|"]
    for stage, seconds in by_stage.most_common():
        lines.append(f"| {stage} | {seconds / steps:.3f} | {100 * seconds / traced:.1f} % |")
    lines += ["", "| HLO instruction kind | traced s / step | share of traced |",
              "|---|---:|---:|"]
    for kind, seconds in by_kind.most_common(args.top):
        lines.append(f"| `{kind}` | {seconds / steps:.3f} | {100 * seconds / traced:.1f} % |")
    lines += ["", "| largest HLO instructions | TF op | traced s / step |", "|---|---|---:|"]
    for (name, op_name), seconds in by_instruction.most_common(args.top):
        lines.append(f"| `{name}` | `{op_name}` | {seconds / steps:.3f} |")
    return lines


def report(args, times, events, stages, xla_times, xla_whiles):
    lines = [f"Step: batch {args.batch}, {args.height}x{args.width}, {NUM_CLASSES} classes, "
             f"{args.num_gt} random gt boxes per image, fp32; {cpu_model()}, {os.cpu_count()} "
             f"cores, tensorflow {package_version('tensorflow')}.", ""]
    lines.append(f"- s/step without XLA: median {statistics.median(times):.3f} "
                 f"({', '.join(f'{t:.3f}' for t in times)})")
    if xla_times:
        lines.append(f"- s/step with XLA: median {statistics.median(xla_times):.3f} "
                     f"({', '.join(f'{t:.3f}' for t in xla_times)})")
    total = sum(seconds for _, _, seconds in events)
    by_stage, by_type = collections.Counter(), collections.Counter()
    for name, op_type, seconds in events:
        by_stage[stage_of(name, stages)] += seconds
        by_type[op_type] += seconds
    lines += ["", f"Op time per step without XLA: {total / args.steps:.2f} s (both executor "
              "threads summed).", "", "| stage | op s / step | share |", "|---|---:|---:|"]
    for stage, seconds in by_stage.most_common():
        lines.append(f"| {stage} | {seconds / args.steps:.3f} | {100 * seconds / total:.1f} % |")
    lines += ["", "| op type | op s / step | share |", "|---|---:|---:|"]
    for op_type, seconds in by_type.most_common(args.top):
        lines.append(f"| {op_type} | {seconds / args.steps:.3f} | "
                     f"{100 * seconds / total:.1f} % |")
    loops = loop_trip_counts(events, args.steps)
    lines += ["", "| tf.while_loop (TF graph) | iterations per step |", "|---|---:|"]
    for loop, count in loops.items():
        lines.append(f"| `{loop}` | {count:.0f} |")
    lines.append(f"| **all loops** | **{sum(loops.values()):.0f}** |")
    if xla_whiles is not None:
        lines += ["", f"`while` instructions in the XLA step's HLO: {xla_whiles}."]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, REPO_ROOT)
    from official_maskrcnn.modeling import maskrcnn_model

    inputs = make_inputs(args)
    model = build_ours()
    step = ours_step_fn(model, jit=False)
    times = time_steps(step, inputs, args.steps)
    stages = {layer.name for layer in model.layers}
    stages.update(getattr(maskrcnn_model, "STAGE_SCOPES", ()))
    events = trace_events(step, inputs, args.steps)
    xla_times = xla_whiles = None
    xla_lines = []
    if not args.no_xla:
        xla_step = ours_step_fn(build_ours(), jit=True)
        xla_times = time_steps(xla_step, inputs, args.steps)
        xla_whiles = hlo_while_count(xla_step, inputs)
        op_names = hlo_op_names(
            xla_step.experimental_get_compiler_ir(inputs)(stage="optimized_hlo"))
        xla_lines = xla_report(args, xla_times, xla_trace_events(xla_step, inputs, args.steps),
                               op_names, stages)
    print("\n".join([report(args, times, events, stages, xla_times, xla_whiles)] + xla_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
