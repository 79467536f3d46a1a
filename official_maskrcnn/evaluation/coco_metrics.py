"""COCO box and mask metrics, as the MLPerf reference computes them (pycocotools' COCOeval).

Two interchangeable back ends (`BACKENDS`): "pycocotools", the reference's own, and
"faster_coco_eval" (`faster-coco-eval`: the same matching and accumulation as pycocotools in
C++, about 10x faster on bbox and 4x on segm; equal to pycocotools within a few float64 ulps, the
order of its sums; tests/evaluation/test_coco_backends.py holds them to 1e-12). The choice is
`run.coco_backend`; `metrics.jsonl` records it.

As maskrcnn-benchmark's `coco_eval`, box and mask results are loaded separately: box results
without 'segmentation' (detection area = w * h) and mask results without 'bbox' (area and box come
from the RLE), so the small / medium / large splits of the mask AP use the mask area. All images of
the ground truth are evaluated unless told otherwise: an image without detections still counts.

COCOeval matches and accumulates each category on its own, so the work splits by category:
`accumulate` runs over a set of categories (in any process), `summarize` joins the shards'
precision / recall arrays in category order and averages them with the back end's own
`summarize`, giving `evaluate`'s stats bit for bit; `category_shards` balances the sets. The
post-processor's worker processes score that way (`evaluator.PostProcessor`).

pycocotools prints progress and its summary table; that text is captured (not printed) and
returned as `summary_text` (faster_coco_eval's progress is dropped and the table is written in
pycocotools' layout). The capture replaces the name `print` inside pycocotools' modules only
for the duration of a call (a lock serialises callers), so other threads, such as a training loop
printing progress while evaluation runs in the background, keep their output.
"""

import collections
import contextlib
import copy
import functools
import io
import os
import threading

import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import cocoeval as cocoeval_lib

from official_maskrcnn.evaluation import mask_pasting

BACKENDS = ("pycocotools", "faster_coco_eval")
IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10", "ARmax100", "ARs",
              "ARm", "ARl")
BBOX = tuple(f"BBOX/{name}" for name in STAT_NAMES)  # qualified names, e.g. for TensorBoard
SEGM = tuple(f"SEGM/{name}" for name in STAT_NAMES)

# (AP or AR, IoU, area, maxDets) of COCOeval.stats[i], for the printed table.
_STAT_ROWS = (("AP", None, "all", 100), ("AP", 0.5, "all", 100), ("AP", 0.75, "all", 100),
              ("AP", None, "small", 100), ("AP", None, "medium", 100),
              ("AP", None, "large", 100), ("AR", None, "all", 1), ("AR", None, "all", 10),
              ("AR", None, "all", 100), ("AR", None, "small", 100),
              ("AR", None, "medium", 100), ("AR", None, "large", 100))
_RESULT_KEYS = {"bbox": ("image_id", "category_id", "bbox", "score"),
                "segm": ("image_id", "category_id", "segmentation", "score")}
_capture_lock = threading.Lock()
# COCOeval's default parameters (IoU thresholds, area ranges, maxDets [1, 10, 100]), which every
# evaluation here uses; the same for bbox and segm.
_DEFAULT_PARAMS = cocoeval_lib.Params(iouType="segm")


@contextlib.contextmanager
def _captured_pycocotools_output():
    """Collects what pycocotools prints (module-level `print` override); yields the buffer."""
    buffer = io.StringIO()

    def capture(*args, sep=" ", end="\n", **unused_kwargs):
        buffer.write(sep.join(str(arg) for arg in args) + end)

    with _capture_lock:
        modules = (coco_lib, cocoeval_lib)
        for module in modules:
            module.print = capture
        try:
            yield buffer
        finally:
            for module in modules:
                del module.print


def check_backend(backend):
    """Raises ValueError unless `backend` is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"coco backend {backend!r} unknown; expected one of {BACKENDS}")


def _faster_coco_eval():
    # Imported on use: a pycocotools-only run never loads the extension.
    import faster_coco_eval
    import faster_coco_eval.core.mask as faster_mask
    if not getattr(faster_mask.calculateRleForAllAnnotations, "reuses_rles", False):
        faster_mask.calculateRleForAllAnnotations = _reusing_rles(
            faster_mask.calculateRleForAllAnnotations)
    return faster_coco_eval


def _reusing_rles(calculate):
    """faster_coco_eval's `calculateRleForAllAnnotations` that converts only the annotations
    without an 'rle' yet.

    Every segm COCOeval's `_prepare` calls it on the ground truth and on the results: it turns
    each 'segmentation' (polygons or RLE) into a compressed RLE dict stored as 'rle', the one
    field its IoU reads. It converts every annotation every time: the ground truth's polygons
    again at each evaluation (the COCO object is cached, `load_ground_truth`), and results
    that are compressed RLE already, decoded and encoded back (about 15 us each, 1.5 ms per
    image of 100 detections, a third of the segm scoring). Here an annotation keeps the 'rle'
    it holds: the ground truth's from its first evaluation (same segmentation, same image
    size), the results' as `_faster_mask_results` sets it (their own segmentation: the IoU
    decodes the same runs from it). Installed once in place of the library's function (the
    module attribute its COCOeval looks up on each call); boundary IoU, which needs more than
    'rle', converts everything as before.
    """

    @functools.wraps(calculate)
    def calculate_missing(annotations, image_sizes, compute_rle, compute_boundary, *args):
        if compute_rle and not compute_boundary:
            annotations = [ann for ann in annotations if "rle" not in ann]
        return calculate(annotations, image_sizes, compute_rle, compute_boundary, *args)

    calculate_missing.reuses_rles = True
    return calculate_missing


@functools.lru_cache(maxsize=4)
def _load_cached(path, unused_mtime_ns, unused_size, backend):
    if backend == "faster_coco_eval":
        return _faster_coco_eval().COCO(path, print_function=_discard)
    with _captured_pycocotools_output():
        return coco_lib.COCO(path)


def _discard(*unused_args, **unused_kwargs):
    pass


class GroundTruthNotFoundError(ValueError):
    """The ground-truth annotations file does not exist (an input error of the user's config:
    the entries report it in one line)."""


def check_ground_truth_file(path):
    """The absolute path of the annotation JSON `path`.

    Raises:
      GroundTruthNotFoundError: no such file.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise GroundTruthNotFoundError(f"ground-truth annotations file not found: {path}")
    return path


def load_ground_truth(path, backend="pycocotools"):
    """The annotation JSON as the back end's COCO object, loaded once per file version and back
    end (cached by path, modification time and size). COCOeval only adds derived fields to it
    (faster_coco_eval caches each annotation's RLE there), so sharing it between evaluations is
    safe; the two back ends never share one."""
    check_backend(backend)
    path = check_ground_truth_file(path)
    stat = os.stat(path)
    return _load_cached(path, stat.st_mtime_ns, stat.st_size, backend)


def _as_backend_ground_truth(ground_truth, backend):
    """A path or COCO object -> the back end's COCO object (a pycocotools COCO given to
    faster_coco_eval is copied: it writes into the annotations)."""
    if isinstance(ground_truth, (str, os.PathLike)):
        return load_ground_truth(ground_truth, backend)
    if backend == "faster_coco_eval" and isinstance(ground_truth, coco_lib.COCO):
        return _faster_coco_eval().COCO(copy.deepcopy(ground_truth.dataset),
                                        print_function=_discard)
    return ground_truth


def _check_results(ground_truth, results, image_ids):
    known_images = set(ground_truth.getImgIds())
    known_categories = set(ground_truth.getCatIds())
    unknown = sorted(set(image_ids) - known_images)
    if unknown:
        raise ValueError(f"image_ids: {len(unknown)} id(s) not in the ground truth, e.g. "
                         f"{unknown[:10]}")
    for position, result in enumerate(results):
        if result.get("image_id") not in known_images:
            raise ValueError(f"results[{position}]: image_id {result.get('image_id')!r} is not "
                             f"an image of the ground truth ({len(known_images)} images)")
        if result.get("category_id") not in known_categories:
            raise ValueError(f"results[{position}]: category_id {result.get('category_id')!r} "
                             f"is not a category of the ground truth (ids "
                             f"{min(known_categories)}..{max(known_categories)})")


def _faster_mask_results(ground_truth, loaded, mask_geometry=None):
    """faster_coco_eval's `loadRes` of mask results: the masks' areas and boxes are
    `mask_geometry` when given, else computed in one C call (`mask_pasting.rle_areas_and_boxes`,
    equal to pycocotools' `area` and `toBbox`; ~5 us per RLE) instead of two calls per result
    (about 2 ms per image of 100 detections)."""
    areas_and_boxes = mask_geometry
    if areas_and_boxes is None:
        try:
            areas_and_boxes = mask_pasting.rle_areas_and_boxes(
                [result["segmentation"] for result in loaded])
        except ValueError as error:
            raise ValueError(f"segm results: {error}") from None
    for index, (result, (area, box)) in enumerate(zip(loaded, areas_and_boxes)):
        # 'rle': what faster_coco_eval would derive from a compressed RLE (`_reusing_rles`).
        result.update(area=area, bbox=box, id=index + 1, iscrowd=0, rle=result["segmentation"])
    detections = _faster_coco_eval().COCO(print_function=_discard)
    detections.dataset = {"info": copy.deepcopy(ground_truth.dataset.get("info", {})),
                          "images": list(ground_truth.dataset["images"]),
                          "categories": copy.deepcopy(ground_truth.dataset["categories"]),
                          "annotations": loaded}
    detections.createIndex()
    return detections


def _new_evaluator(ground_truth, detections, iou_type, backend):
    if backend == "faster_coco_eval":
        # One thread: the run's parallelism is its processes; threads would only contend.
        return _faster_coco_eval().COCOeval_faster(ground_truth, detections, iouType=iou_type,
                                                   print_function=_discard,
                                                   rle_iou_max_workers=1)
    return cocoeval_lib.COCOeval(ground_truth, detections, iouType=iou_type)


def _accumulate_one(ground_truth, results, image_ids, category_ids, iou_type, backend,
                    mask_geometry):
    """COCOeval evaluate + accumulate of one iou type: {'precision': [T, R, K, A, 1],
    'recall': [T, K, A, M]} over the K categories `category_ids` (sorted); precision only at
    the largest maxDets (100), the only one the 12 stats read: a third of the bytes a worker
    sends back (its full array is ~4 MB for 40 categories)."""
    missing = [key for key in _RESULT_KEYS[iou_type] if key not in results[0]]
    if missing:
        raise ValueError(f"{iou_type} evaluation: results[0] has no {missing} (keys found: "
                         f"{sorted(results[0])})")
    # Fresh dicts: loadRes adds fields (id, area, ...) in place.
    loaded = [{key: result[key] for key in _RESULT_KEYS[iou_type]} for result in results]
    with _captured_pycocotools_output():
        if backend == "faster_coco_eval" and iou_type == "segm":
            detections = _faster_mask_results(ground_truth, loaded, mask_geometry)
        else:
            detections = ground_truth.loadRes(loaded)
        evaluator = _new_evaluator(ground_truth, detections, iou_type, backend)
        evaluator.params.imgIds = list(image_ids)
        evaluator.params.catIds = list(category_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    return {"precision": np.ascontiguousarray(evaluator.eval["precision"][..., -1:]),
            "recall": evaluator.eval["recall"]}


def accumulate(ground_truth, results, image_ids=None, category_ids=None, iou_types=IOU_TYPES,
               backend="pycocotools", mask_geometry=None):
    """COCOeval's per-category precision and recall over a set of categories (a shard): the part
    of the evaluation that can run in separate processes, category sets apart, since COCOeval
    matches and accumulates every category on its own. `summarize` joins shards.

    Args:
      ground_truth, results, image_ids, iou_types, backend, mask_geometry: as `evaluate`
        (results must not be empty; results of other categories are ignored).
      category_ids: the shard's categories (default: every category of the ground truth).
    Returns:
      {'category_ids': sorted list, iou_type: {'precision': [T, R, K, A, 1] array,
      'recall': [T, K, A, M] array}, ...}: COCOeval's `eval` arrays (K in category order),
      precision only at the largest maxDets (the only one the stats read).
    Raises:
      ValueError: as `evaluate`, or no result of these categories.
    """
    check_backend(backend)
    ground_truth = _as_backend_ground_truth(ground_truth, backend)
    _check_iou_types(iou_types)
    image_ids = sorted(ground_truth.getImgIds() if image_ids is None else
                       {int(i) for i in image_ids})
    category_ids = sorted(ground_truth.getCatIds() if category_ids is None else
                          {int(c) for c in category_ids})
    wanted = set(category_ids)
    results = list(results)
    kept = [index for index, result in enumerate(results)
            if result.get("category_id") in wanted]
    if not kept:
        raise ValueError(f"no results of categories {category_ids[:10]} to accumulate")
    _check_mask_geometry(mask_geometry, results)
    if len(kept) < len(results):
        results = [results[index] for index in kept]
        if mask_geometry is not None:
            mask_geometry = [mask_geometry[index] for index in kept]
    _check_results(ground_truth, results, image_ids)
    return _accumulate(ground_truth, results, image_ids, category_ids, iou_types, backend,
                       mask_geometry)


def _check_mask_geometry(mask_geometry, results):
    if mask_geometry is not None and len(mask_geometry) != len(results):
        raise ValueError(f"mask_geometry: {len(mask_geometry)} entries for {len(results)} "
                         f"results")


def _accumulate(ground_truth, results, image_ids, category_ids, iou_types, backend,
                mask_geometry=None):
    """`accumulate` of checked arguments (sorted ids, a backend COCO object, results only of
    `category_ids`, mask_geometry None or one entry per result)."""
    accumulation = {"category_ids": category_ids}
    for iou_type in iou_types:
        accumulation[iou_type] = _accumulate_one(ground_truth, results, image_ids, category_ids,
                                                 iou_type, backend, mask_geometry)
    return accumulation


def summarize(accumulations, iou_types=IOU_TYPES, backend="pycocotools"):
    """The metrics of `evaluate` from the `accumulate` results of disjoint category shards.

    The shards' arrays are joined along the category axis in category order, exactly the arrays
    one COCOeval over all categories accumulates, and averaged as COCOeval's `summarize` does
    (`_summary_stats`): the stats equal `evaluate`'s bit for bit, and pycocotools' own
    `summarize` of one COCOeval bit for bit (tests/evaluation/test_coco_metrics.py).
    faster_coco_eval's `summarize` is the same expression; `backend` is only checked.
    """
    check_backend(backend)
    category_ids = [c for accumulation in accumulations for c in accumulation["category_ids"]]
    if len(set(category_ids)) != len(category_ids):
        raise ValueError("summarize: the shards' categories overlap")
    order = sorted(range(len(category_ids)), key=category_ids.__getitem__)
    metrics, tables = {}, []
    for iou_type in iou_types:
        precision = np.concatenate([a[iou_type]["precision"][..., -1] for a in accumulations],
                                   axis=2)[:, :, order]
        recall = np.concatenate([a[iou_type]["recall"] for a in accumulations],
                                axis=1)[:, order]
        metrics[iou_type] = _summary_stats(precision, recall)
        tables.append(f"{iou_type}:\n{_format_table(metrics[iou_type])}")
    metrics["summary_text"] = "".join(tables)
    return metrics


def _summary_stats(precision, recall):
    """COCOeval's 12 summary stats (`summarize` of default parameters) from its arrays: each the
    mean of the selected values above -1 ("absent"), -1.0 when none is, with COCOeval's
    selections in its element order, so the same numpy mean gives the same bits.

    Args:
      precision: [T, R, K, A] precision at the largest maxDets (100), the only one AP reads.
      recall: [T, K, A, M].
    Returns:
      {stat name (STAT_NAMES): float}.
    """
    params = _DEFAULT_PARAMS

    def mean_above_absent(values):
        values = values[values > -1]
        return float(np.mean(values)) if values.size else -1.0

    def average_precision(iou=None, area="all"):
        values = precision[:, :, :, params.areaRngLbl.index(area)]
        if iou is not None:
            values = values[np.where(iou == params.iouThrs)[0]]
        return mean_above_absent(values)

    def average_recall(max_dets, area="all"):
        return mean_above_absent(recall[:, :, params.areaRngLbl.index(area),
                                        params.maxDets.index(max_dets)])

    few, some, most = params.maxDets
    return dict(zip(STAT_NAMES, (
        average_precision(), average_precision(0.5), average_precision(0.75),
        average_precision(area="small"), average_precision(area="medium"),
        average_precision(area="large"), average_recall(few), average_recall(some),
        average_recall(most), average_recall(most, "small"), average_recall(most, "medium"),
        average_recall(most, "large"))))


def category_shards(ground_truth, result_categories, num_shards):
    """Every category of the ground truth in at most `num_shards` groups of similar COCOeval
    work, each with at least one result (a category's work grows with its results and ground
    truth objects; the largest go first to the lightest group).

    Args:
      ground_truth: the back end's COCO object.
      result_categories: the category id of each result (an iterable of ints).
      num_shards: the most groups wanted.
    Returns:
      list of sorted category-id lists (fewer than num_shards when fewer categories have
      results; empty when there is no result).
    """
    counts = collections.Counter(result_categories)
    with_results = list(counts)
    num_shards = max(1, min(int(num_shards), len(with_results)))
    if not with_results:
        return []

    def weight(category):
        return counts.get(category, 0) + len(ground_truth.catToImgs.get(category, ()))

    shards = [[] for _ in range(num_shards)]
    loads = [0] * num_shards
    seeded = sorted(with_results, key=lambda c: (-weight(c), str(c)))
    rest = sorted(set(ground_truth.getCatIds()) - set(with_results), key=lambda c: -weight(c))
    for position, category in enumerate(seeded + rest):
        # The first num_shards categories seed one shard each, so that none is without results.
        target = position if position < num_shards else loads.index(min(loads))
        shards[target].append(category)
        loads[target] += weight(category)
    return [sorted(shard) for shard in shards]


def _check_iou_types(iou_types):
    unknown_types = [t for t in iou_types if t not in IOU_TYPES]
    if unknown_types:
        raise ValueError(f"iou_types {unknown_types} unknown; expected some of {IOU_TYPES}")


def evaluate(ground_truth, results, image_ids=None, iou_types=IOU_TYPES, backend="pycocotools",
             mask_geometry=None):
    """COCO metrics of `results` (the dicts of `coco_results.detections_to_coco`).

    Args:
      ground_truth: a pycocotools COCO, or the path of the annotation JSON (`load_ground_truth`).
      results: list of dicts {image_id, category_id, bbox [x, y, w, h], score, segmentation}
        ('segmentation' needed only for 'segm').
      image_ids: the images to evaluate (default: every image of the ground truth).
      iou_types: any of 'bbox', 'segm'.
      backend: one of BACKENDS (the COCOeval implementation; same metrics).
      mask_geometry: optional [(area, [x, y, w, h])], one per result: its mask's pixel count
        and box as pycocotools' `area` and `toBbox` give them, known to the paster
        (`coco_results.ResultColumns.mask_geometry`); faster_coco_eval's segm scoring then
        skips computing them from the RLEs (pycocotools' `loadRes` always does).
    Returns:
      {iou_type: {stat name (STAT_NAMES): float}, ..., 'summary_text': pycocotools' tables}.
      No results at all: every stat 0.0. A stat pycocotools cannot compute (no ground truth in
      that area range) is -1.0, as pycocotools reports it.
    Raises:
      ValueError: a result names an image or category the ground truth does not have, an image
        id is unknown, an iou type or back end is unknown, or results lack a key the iou type
        needs.
    """
    check_backend(backend)
    ground_truth = _as_backend_ground_truth(ground_truth, backend)
    _check_iou_types(iou_types)
    results = list(results)
    image_ids = sorted(ground_truth.getImgIds() if image_ids is None else
                       {int(i) for i in image_ids})
    _check_results(ground_truth, results, image_ids)
    _check_mask_geometry(mask_geometry, results)
    if not results:  # pycocotools' loadRes cannot load an empty list
        metrics = {iou_type: dict.fromkeys(STAT_NAMES, 0.0) for iou_type in iou_types}
        metrics["summary_text"] = format_stats_table(metrics)
        return metrics
    accumulation = _accumulate(ground_truth, results, image_ids, sorted(ground_truth.getCatIds()),
                               iou_types, backend, mask_geometry)
    return summarize([accumulation], iou_types, backend)


def _format_table(stats):
    lines = []
    for name, (kind, iou, area, max_dets) in zip(STAT_NAMES, _STAT_ROWS):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        lines.append(f" {title:<18} ({kind}) @[ IoU={iou_text:<9} | area={area:>6s} | "
                     f"maxDets={max_dets:>3d} ] = {stats[name]:0.3f}\n")
    return "".join(lines)


def format_stats_table(metrics):
    """The 12-line COCO tables (pycocotools' layout) of the iou types in `metrics` (the dict of
    `evaluate`; other keys are ignored)."""
    return "".join(f"{iou_type}:\n{_format_table(metrics[iou_type])}"
                   for iou_type in IOU_TYPES if iou_type in metrics)
