"""Benchmark: COCO -> TFRecord converter throughput and peak memory, ours vs tf-models-official.

Exact command (from the repository root)::

    .venv/bin/python benchmarks/bench_converter.py --workers 1,2 --repeats 3 --num_shards 4

Defaults read coco128 from ``../shared/data/coco128`` (resolved from the repository root).

What it measures, for each worker count K and each converter, on the same input:

* ours: ``<python> -m tfrecord_tools.create_coco_tfrecord ... --num_workers K``
  (K = 1 runs in-process);
* peer: ``<python> -m official.vision.data.create_coco_tf_record ... --include_masks=True
  --num_processes=K``. For K = 1 the peer is run both with ``--num_processes=0`` (in-process,
  no pool) and ``--num_processes=1`` (a one-process pool) and the FASTER variant is the peer
  figure, which is conservative for us.

Each run is one subprocess (cwd = repository root), so the TensorFlow import is included for
both converters. Per run it records:

* wall seconds: ``time.perf_counter()`` around the whole process;
* peak tree RSS: the maximum over time of the SUM of VmRSS of the process and all of its
  descendants, sampled from ``/proc`` every ~20 ms (children found through
  ``/proc/<pid>/task/*/children``; a child is summed once seen in two consecutive samples, so
  a helper caught between vfork() and exec() is not counted as a copy of its parent). Pages
  shared between processes (TensorFlow's shared libraries, copy-on-write pages after
  ``fork``) are counted once per process, so this over-states physical memory for
  multi-process runs; the sum of RssAnon is recorded too;
* peak main RSS: the main process alone (kernel high-water mark VmHWM, read at each sample);
* images/s: records written / wall seconds. Records are counted after timing (not timed) with
  ``tf.data.TFRecordDataset`` in a separate process, and must equal the number of images in
  the input JSON (128 on coco128), else the benchmark fails.

Runs are interleaved (ours, peer, ours, peer, ... with the order reversed on odd repeats) to
spread machine noise, after one untimed read of the input files to warm the page cache. The
report gives the median over repeats and the ratios ours/peer of images/s (> 1: ours faster)
and of peak tree RSS (< 1: ours smaller), as Markdown, followed by the exact commands run.

``--scale N`` writes a temporary COCO JSON repeating the input's images N times with fresh image
and annotation ids (same file names, no image copies), to show whether peak memory stays flat
as the dataset grows (compare ``--scale 1`` with ``--scale 4``).
"""

import argparse
import datetime
import glob
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from machine import cpu_model, mem_total_gib, package_version

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "coco128"))
DEFAULT_IMAGE_DIR = os.path.join(DEFAULT_DATA, "train2017")
DEFAULT_ANNOTATIONS = os.path.join(DEFAULT_DATA, "annotations", "instances_train2017.json")

OURS_MODULE = "tfrecord_tools.create_coco_tfrecord"
PEER_MODULE = "official.vision.data.create_coco_tf_record"
SAMPLE_INTERVAL_S = 0.02
STDERR_TAIL_LINES = 40
KIB_PER_MIB = 1024.0

COUNT_RECORDS_CODE = (
    "import sys\n"
    "import tensorflow as tf\n"
    "ds = tf.data.TFRecordDataset(sorted(sys.argv[1:]))\n"
    "print(int(ds.reduce(0, lambda n, _: n + 1)))\n"
)


class BenchmarkError(RuntimeError):
    """A converter run failed or wrote an unexpected number of records."""


def parse_workers(text):
    """Parses a comma-separated list of positive worker counts, e.g. ``"1,2"``."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bad worker list {text!r}: {err}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"worker counts must be >= 1, got {text!r}")
    return sorted(set(values))


def parse_args(argv):
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--image_dir", default=DEFAULT_IMAGE_DIR, help="COCO image directory.")
    parser.add_argument(
        "--annotations_file", default=DEFAULT_ANNOTATIONS, help="COCO instances JSON."
    )
    parser.add_argument(
        "--workers", type=parse_workers, default=[1, 2], help="Worker counts, e.g. 1,2."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Runs per configuration.")
    parser.add_argument("--num_shards", type=int, default=4, help="Output shards per run.")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="Where runs write (each run's records are deleted once counted). "
        "Default: a temporary directory, deleted at the end.",
    )
    parser.add_argument("--json_out", default=None, help="Optional path for the raw results.")
    parser.add_argument(
        "--only", choices=("ours", "peer", "both"), default="both", help="Converters to run."
    )
    parser.add_argument(
        "--scale", type=int, default=1, help="Repeat the input's images N times (fresh ids)."
    )
    parser.add_argument(
        "--python", default=sys.executable, help="Interpreter that runs both converters."
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="Seconds before a run is killed."
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.num_shards < 1 or args.scale < 1:
        parser.error("--repeats, --num_shards and --scale must be >= 1")
    return args


def display_path(path):
    """Returns ``path`` relative to the repository root if it is in or next to it, else absolute.

    The returned string is what the converter commands receive (they run with cwd = repository
    root), so the printed commands are exactly the commands run.
    """
    path = os.path.abspath(path)
    rel = os.path.relpath(path, REPO_ROOT)
    if rel == os.pardir or rel.startswith(os.path.join(os.pardir, os.pardir)):
        return path
    return rel


# --------------------------------------------------------------------------------------------
# /proc memory sampling
# --------------------------------------------------------------------------------------------


def read_status_kib(pid):
    """Returns VmRSS, VmHWM and RssAnon (KiB) of ``pid`` from /proc; zeros if it is gone."""
    values = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return values


def child_pids(pid):
    """Returns the direct children of ``pid`` (over all of its threads) from /proc."""
    children = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path, encoding="ascii") as handle:
                children.extend(int(child) for child in handle.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return children


def process_tree(pid):
    """Returns ``pid`` followed by all of its live descendants."""
    tree, pending, seen = [], [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        tree.append(current)
        pending.extend(child_pids(current))
    return tree


def tree_rss(pid, stable=None):
    """Samples memory (KiB) of ``pid`` and its descendants.

    Returns a dict with ``tree_rss`` (sum of VmRSS), ``tree_anon`` (sum of RssAnon),
    ``main_rss`` and ``main_hwm`` (VmRSS and VmHWM of ``pid`` alone), ``processes`` (how many
    were summed) and ``pids`` (all descendants seen, summed or not). If ``stable`` (a set of
    pids) is given, only descendants in it are summed: the sampler passes the pids of the
    previous sample, so a child counts once it has lived ~20 ms. This drops the microseconds
    between vfork() and exec() of a helper (e.g. ``uname -p`` run while TensorFlow imports),
    during which the child reports its parent's whole VmRSS and would double the sum.
    """
    tree = process_tree(pid)
    summed = [member for member in tree[1:] if stable is None or member in stable]
    main = read_status_kib(pid)
    statuses = [main] + [read_status_kib(member) for member in summed]
    return {
        "tree_rss": sum(status["VmRSS"] for status in statuses),
        "tree_anon": sum(status["RssAnon"] for status in statuses),
        "main_rss": main["VmRSS"],
        "main_hwm": main["VmHWM"],
        "processes": len(statuses),
        "pids": set(tree[1:]),
    }


class MemorySampler(threading.Thread):
    """Background thread that keeps the peak of :func:`tree_rss` until stopped."""

    def __init__(self, pid, interval=SAMPLE_INTERVAL_S):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak = {"tree_rss": 0, "tree_anon": 0, "main_rss": 0, "main_hwm": 0, "processes": 0}
        self.samples = 0

    def run(self):
        """Samples until :meth:`stop` is called."""
        previous = set()
        while not self.stop_event.is_set():
            sample = tree_rss(self.pid, stable=previous)
            previous = sample.pop("pids")
            for key, value in sample.items():
                self.peak[key] = max(self.peak[key], value)
            self.samples += 1
            self.stop_event.wait(self.interval)

    def stop(self):
        """Stops sampling and waits for the thread."""
        self.stop_event.set()
        self.join()


def kill_group(proc):
    """Kills the process group of ``proc`` (started by us with its own session)."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path, lines=STDERR_TAIL_LINES):
    """Returns the last ``lines`` lines of a text file."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return "".join(handle.readlines()[-lines:])


def run_and_measure(cmd, cwd=REPO_ROOT, timeout=3600.0, log_dir=None):
    """Runs ``cmd`` as a subprocess and measures wall time and peak memory of its process tree.

    Returns a dict with ``wall_s``, ``peak_tree_rss_mib``, ``peak_tree_anon_mib``,
    ``peak_main_rss_mib``, ``max_processes``, ``samples``, ``returncode`` and ``stderr_tail``.
    stdout and stderr go to files (never pipes, so a chatty process cannot block on a full pipe).
    """
    log_dir = log_dir or tempfile.gettempdir()
    out_path = os.path.join(log_dir, "stdout.log")
    err_path = os.path.join(log_dir, "stderr.log")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, start_new_session=True)
        sampler = MemorySampler(proc.pid)
        sampler.start()
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            returncode = f"timeout after {timeout:.0f} s"
        except BaseException:
            kill_group(proc)
            raise
        finally:
            wall_s = time.perf_counter() - start
            sampler.stop()
    peak = sampler.peak
    return {
        "wall_s": wall_s,
        "peak_tree_rss_mib": peak["tree_rss"] / KIB_PER_MIB,
        "peak_tree_anon_mib": peak["tree_anon"] / KIB_PER_MIB,
        "peak_main_rss_mib": max(peak["main_rss"], peak["main_hwm"]) / KIB_PER_MIB,
        "max_processes": peak["processes"],
        "samples": sampler.samples,
        "returncode": returncode,
        "stderr_tail": tail(err_path) if returncode != 0 else "",
    }


# --------------------------------------------------------------------------------------------
# Inputs, commands and record counting
# --------------------------------------------------------------------------------------------


def load_json(path):
    """Reads a JSON file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_scaled_annotations(annotations_file, scale, output_path):
    """Writes a COCO JSON repeating the images ``scale`` times with fresh image/annotation ids.

    File names are unchanged, so the copies read the same image files. Returns the image count.
    """
    coco = load_json(annotations_file)
    images, annotations = [], []
    image_stride = max(image["id"] for image in coco["images"]) + 1
    ann_stride = max((ann["id"] for ann in coco["annotations"]), default=0) + 1
    for copy in range(scale):
        for image in coco["images"]:
            images.append(dict(image, id=image["id"] + copy * image_stride))
        for ann in coco["annotations"]:
            image_id = ann["image_id"] + copy * image_stride
            annotations.append(dict(ann, id=ann["id"] + copy * ann_stride, image_id=image_id))
    coco["images"], coco["annotations"] = images, annotations
    with open(output_path, "w", encoding="utf-8") as handle:
        json.dump(coco, handle)
    return len(images)


def warm_page_cache(image_dir, annotations_file):
    """Reads every image named by the annotations once, untimed, so no run pays cold reads.

    Best effort: a missing image is left for the converters to report. Returns how many were read.
    """
    coco = load_json(annotations_file)
    read = 0
    for name in sorted({image["file_name"] for image in coco["images"]}):
        try:
            with open(os.path.join(image_dir, name), "rb") as handle:
                while handle.read(1 << 20):
                    pass
            read += 1
        except OSError:
            continue
    return read


def ours_command(python, image_dir, annotations_file, prefix, num_shards, workers):
    """Our converter's command line (interface fixed by the project)."""
    return [
        python, "-m", OURS_MODULE,
        "--image_dir", image_dir,
        "--annotations_file", annotations_file,
        "--output_prefix", prefix,
        "--num_shards", str(num_shards),
        "--num_workers", str(workers),
    ]


def peer_command(python, image_dir, annotations_file, prefix, num_shards, processes):
    """tf-models-official's converter command line (``--num_processes=0``: no pool)."""
    return [
        python, "-m", PEER_MODULE,
        f"--image_dir={image_dir}",
        f"--object_annotations_file={annotations_file}",
        f"--output_file_prefix={prefix}",
        f"--num_shards={num_shards}",
        "--include_masks=True",
        f"--num_processes={processes}",
    ]


def build_variants(args, paths):
    """Returns the configurations to run, one dict per (converter, worker count, variant)."""
    variants = []
    for workers in args.workers:
        if args.only in ("ours", "both"):
            prefix = os.path.join(paths["output_dir"], f"ours-w{workers}", "train")
            variants.append(
                {
                    "name": f"ours-w{workers}",
                    "converter": "ours",
                    "workers": workers,
                    "flag": f"--num_workers {workers}",
                    "prefix": prefix,
                    "cmd": ours_command(
                        paths["python"], paths["image_dir"], paths["annotations_file"],
                        display_path(prefix), args.num_shards, workers,
                    ),
                }
            )
        if args.only in ("peer", "both"):
            for processes in (0, 1) if workers == 1 else (workers,):
                prefix = os.path.join(paths["output_dir"], f"peer-np{processes}", "train")
                variants.append(
                    {
                        "name": f"peer-np{processes}",
                        "converter": "peer",
                        "workers": workers,
                        "flag": f"--num_processes={processes}",
                        "prefix": prefix,
                        "cmd": peer_command(
                            paths["python"], paths["image_dir"], paths["annotations_file"],
                            display_path(prefix), args.num_shards, processes,
                        ),
                    }
                )
    return variants


def count_records(python, shard_files):
    """Counts records with tf.data.TFRecordDataset in a separate process (not timed)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [python, "-c", COUNT_RECORDS_CODE, *shard_files],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BenchmarkError(f"counting records failed:\n{result.stderr[-4000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def run_variant(variant, python, expected, num_shards, timeout):
    """Runs one configuration once: measure, then count its records and delete its output."""
    run_dir = os.path.dirname(variant["prefix"])
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    log_dir = tempfile.mkdtemp(prefix="bench_logs_")
    try:
        result = run_and_measure(variant["cmd"], timeout=timeout, log_dir=log_dir)
    except OSError as err:
        raise BenchmarkError(f"{variant['name']} could not start: {err}") from err
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    if result["returncode"] != 0:
        raise BenchmarkError(
            f"{variant['name']} failed (exit {result['returncode']}): {shlex.join(variant['cmd'])}"
            f"\n--- stderr tail ---\n{result['stderr_tail']}"
        )
    shards = sorted(glob.glob(variant["prefix"] + "-*-of-*.tfrecord"))
    if not shards:
        raise BenchmarkError(f"{variant['name']} wrote no shards matching {variant['prefix']}-*")
    result["shards"] = len(shards)
    if len(shards) != num_shards:
        print(
            f"WARNING: {variant['name']} wrote {len(shards)} shards, not {num_shards}",
            file=sys.stderr,
        )
    result["output_mib"] = sum(os.path.getsize(shard) for shard in shards) / 2.0**20
    result["records"] = count_records(python, shards)
    shutil.rmtree(run_dir, ignore_errors=True)
    if result["records"] != expected:
        raise BenchmarkError(
            f"{variant['name']} wrote {result['records']} records, expected {expected}"
        )
    result["images_per_s"] = result["records"] / result["wall_s"]
    return result


def run_all(variants, args, python, expected):
    """Runs each variant ``args.repeats`` times, interleaved; odd repeats run in reverse order."""
    runs = {variant["name"]: [] for variant in variants}
    for repeat in range(args.repeats):
        for workers in args.workers:
            group = [variant for variant in variants if variant["workers"] == workers]
            if repeat % 2:
                group.reverse()
            for variant in group:
                result = run_variant(variant, python, expected, args.num_shards, args.timeout)
                runs[variant["name"]].append(result)
                print(
                    f"[{repeat + 1}/{args.repeats}] {variant['name']:<10} "
                    f"{result['wall_s']:7.2f} s {result['images_per_s']:7.2f} img/s "
                    f"tree {result['peak_tree_rss_mib']:7.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


# --------------------------------------------------------------------------------------------
# Summary and report
# --------------------------------------------------------------------------------------------

SUMMARY_KEYS = (
    "wall_s",
    "images_per_s",
    "peak_tree_rss_mib",
    "peak_main_rss_mib",
    "peak_tree_anon_mib",
    "output_mib",
)


def summarize(variants, runs):
    """Median over repeats of each metric, per variant."""
    summary = {}
    for variant in variants:
        results = runs[variant["name"]]
        summary[variant["name"]] = {
            key: statistics.median(result[key] for result in results) for key in SUMMARY_KEYS
        }
        summary[variant["name"]]["wall_s_all"] = [result["wall_s"] for result in results]
        summary[variant["name"]]["max_processes"] = max(r["max_processes"] for r in results)
    return summary


def ratios(variants, summary, workers_list):
    """Ratio ours/peer per worker count; the peer figure is its fastest variant (median img/s)."""
    rows = []
    for workers in workers_list:
        ours = [v for v in variants if v["converter"] == "ours" and v["workers"] == workers]
        peers = [v for v in variants if v["converter"] == "peer" and v["workers"] == workers]
        if not ours or not peers:
            continue
        best = max(peers, key=lambda v: summary[v["name"]]["images_per_s"])
        ours_sum, peer_sum = summary[ours[0]["name"]], summary[best["name"]]
        rows.append(
            {
                "workers": workers,
                "peer_variant": best["flag"],
                "ours_images_per_s": ours_sum["images_per_s"],
                "peer_images_per_s": peer_sum["images_per_s"],
                "speed_ratio": ours_sum["images_per_s"] / peer_sum["images_per_s"],
                "ours_peak_tree_rss_mib": ours_sum["peak_tree_rss_mib"],
                "peer_peak_tree_rss_mib": peer_sum["peak_tree_rss_mib"],
                "memory_ratio": ours_sum["peak_tree_rss_mib"] / peer_sum["peak_tree_rss_mib"],
            }
        )
    return rows


def machine_info():
    """Machine and software description (tensorflow is not imported here)."""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_total_gib": round(mem_total_gib(), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tensorflow": package_version("tensorflow"),
        "tf-models-official": package_version("tf-models-official"),
        "pycocotools": package_version("pycocotools"),
        "Pillow": package_version("Pillow"),
        "numpy": package_version("numpy"),
    }


def markdown_report(args, machine, paths, variants, summary, ratio_rows, bench_cmd):
    """Builds the Markdown report: machine, per-variant table, ratio table, commands."""
    lines = [
        f"### COCO -> TFRecord converter: ours vs tf-models-official ({machine['date_utc']})",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['cores_usable']} usable), "
        f"{machine['mem_total_gib']} GiB RAM, Linux {machine['kernel']}; Python "
        f"{machine['python']}, tensorflow {machine['tensorflow']}, tf-models-official "
        f"{machine['tf-models-official']}, pycocotools {machine['pycocotools']}, "
        f"Pillow {machine['Pillow']}, numpy {machine['numpy']}.",
        "",
        f"Input: `{paths['image_dir']}` + `{paths['annotations_file']}` "
        f"({paths['expected']} images, scale {args.scale}); {args.num_shards} shards; "
        f"median of {args.repeats} run(s) per row, runs interleaved. Wall time covers the whole "
        "process (TensorFlow import included); images/s = records read back / wall s; peak "
        "tree RSS = max over time of the summed VmRSS of the process and its descendants "
        f"(sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms; shared pages count once per "
        "process); peak anon = same sum of RssAnon.",
        "",
        "| workers | converter | flag | wall s (median) | wall s (all runs) | images/s "
        "| peak tree RSS MiB | peak main RSS MiB | peak tree anon MiB | processes | output MiB |",
        "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        row = summary[variant["name"]]
        converter = "ours" if variant["converter"] == "ours" else "tf-models-official"
        all_runs = ", ".join(f"{wall:.2f}" for wall in row["wall_s_all"])
        lines.append(
            f"| {variant['workers']} | {converter} | `{variant['flag']}` | {row['wall_s']:.2f} "
            f"| {all_runs} | {row['images_per_s']:.2f} | {row['peak_tree_rss_mib']:.0f} "
            f"| {row['peak_main_rss_mib']:.0f} | {row['peak_tree_anon_mib']:.0f} "
            f"| {row['max_processes']} | {row['output_mib']:.1f} |"
        )
    if ratio_rows:
        lines += [
            "",
            "Ratio ours / peer (speed > 1: ours faster; memory < 1: ours smaller). For 1 worker "
            "the peer was run with `--num_processes=0` (in-process) and `--num_processes=1` "
            "(one-process pool); the faster of the two is the peer figure.",
            "",
            "| workers | peer figure | ours images/s | peer images/s | speed ratio "
            "| ours peak tree MiB | peer peak tree MiB | memory ratio |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in ratio_rows:
            lines.append(
                f"| {row['workers']} | `{row['peer_variant']}` | {row['ours_images_per_s']:.2f} "
                f"| {row['peer_images_per_s']:.2f} | {row['speed_ratio']:.2f} "
                f"| {row['ours_peak_tree_rss_mib']:.0f} | {row['peer_peak_tree_rss_mib']:.0f} "
                f"| {row['memory_ratio']:.2f} |"
            )
    lines += [
        "",
        "Commands (cwd = repository root; the benchmark first, then each timed converter run; "
        "each run's output is counted and deleted before the next run):",
        "",
        "```sh",
        bench_cmd,
    ]
    if paths["scaled_from"]:
        lines.append(
            f"# {paths['annotations_file']} = {paths['scaled_from']} with its images repeated "
            f"{args.scale}x (fresh ids)"
        )
    lines += [shlex.join(variant["cmd"]) for variant in variants]
    lines += ["```"]
    return "\n".join(lines)


def bench_command(argv, python):
    """The benchmark's own command line as run from the repository root."""
    return shlex.join([python, "benchmarks/bench_converter.py", *argv])


def prepare_paths(args, output_dir):
    """Resolves input/output paths (as passed to the converters) and the expected record count."""
    annotations_file = os.path.abspath(args.annotations_file)
    scaled_from = None
    if args.scale > 1:
        scaled_from = display_path(annotations_file)
        annotations_file = os.path.join(output_dir, f"instances_scale{args.scale}.json")
        expected = write_scaled_annotations(args.annotations_file, args.scale, annotations_file)
    else:
        expected = len(load_json(annotations_file)["images"])
    return {
        "python": display_path(args.python) if os.sep in args.python else args.python,
        "image_dir": display_path(args.image_dir),
        "annotations_file": display_path(annotations_file),
        "scaled_from": scaled_from,
        "output_dir": output_dir,
        "expected": expected,
    }


def main(argv=None):
    """Runs the benchmark and prints the Markdown report; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    own_tmp = args.output_dir is None
    output_dir = tempfile.mkdtemp(prefix="bench_converter_") if own_tmp else args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    output_dir = os.path.abspath(output_dir)
    try:
        if not os.path.isdir(args.image_dir) or not os.path.isfile(args.annotations_file):
            raise BenchmarkError(f"missing input: {args.image_dir} or {args.annotations_file}")
        paths = prepare_paths(args, output_dir)
        warm_page_cache(args.image_dir, args.annotations_file)
        variants = build_variants(args, paths)
        machine = machine_info()
        runs = run_all(variants, args, paths["python"], paths["expected"])
    except BenchmarkError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    finally:
        if own_tmp:
            shutil.rmtree(output_dir, ignore_errors=True)
    summary = summarize(variants, runs)
    ratio_rows = ratios(variants, summary, args.workers)
    report = markdown_report(
        args, machine, paths, variants, summary, ratio_rows, bench_command(argv, paths["python"])
    )
    print(report)
    if args.json_out:
        raw = {
            "machine": machine,
            "args": vars(args),
            "paths": paths,
            "variants": [
                {key: variant[key] for key in ("name", "converter", "workers", "flag", "cmd")}
                for variant in variants
            ],
            "runs": runs,
            "summary": summary,
            "ratios": ratio_rows,
        }
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(raw, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
