/* The reference's mask pasting, straight to compressed COCO RLE, for `mask_pasting`.
 *
 * paste_rles(masks, boxes, height, width, threshold) -> [(counts, area, [x, y, w, h]), ...]
 *   masks:  [T, M, M] float32, C-contiguous (probabilities of the detected class).
 *   boxes:  [T, 4] int64 [x0, y0, x1, y1] inclusive paste boxes (`expanded_int_boxes`).
 *   height, width: H, W of the image.
 *   threshold: a pixel is set when its resized value is > threshold.
 * For each detection: the compressed COCO RLE string of its H x W binary mask (the bytes
 * pycocotools' `encode` would write), its pixel count (`area`) and its bounding box (`toBbox`:
 * [x, y, w, h] of the set pixels, zeros for an empty mask).
 *
 * Pixel values. The mask is zero-padded to S x S (S = M + 2) and resized to the box's h x w by
 * torch's bilinear rule (align_corners=False) in float32:
 *   src = max(scale * (dst + 0.5) - 0.5, 0), scale = (float) S / out, i0 = min((int) src, S - 1),
 *   i1 = i0 + (i0 < S - 1), l1 = src - i0, l0 = 1 - l1;
 *   value = l0y * (l0x * P[i0y][i0x] + l1x * P[i0y][i1x]) + l1y * (l0x * P[i1y][i0x] + ...),
 * the x interpolation first, every product and sum rounded to float32 (the build turns off
 * fused multiply-add contraction: -ffp-contract=off).
 *
 * Speed. Visible rows that share their source rows (i0, i1) form a segment. For the image
 * columns that share their source columns (j0, j1) a plan is made once: a segment whose 2 x 2
 * source cell has all four corners clear of the threshold by more than a bound on float32
 * rounding is set (or clear) as a whole, and such neighbours merge. In each column the remaining
 * segments get their two x-interpolated values; those clear of the threshold (one lerp's
 * rounding) are again decided whole, and only the rest, the rows near the mask's edge, are
 * evaluated pixel by pixel with the exact expression above. Every pixel is exactly what the
 * pixel-by-pixel evaluation gives; runs come out in column-major order, merging across columns.
 *
 * rle_area_bbox(rles) -> [(area, [x, y, w, h]), ...]: pycocotools' `area` and `toBbox` of
 * compressed RLEs in one call, with clear errors for malformed ones.
 *
 * The work runs without the GIL; only the result objects are built with it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MASK_PADDING 1

typedef struct {
    int64_t *data;
    size_t size, capacity;
} Counts;

static int counts_push(Counts *counts, int64_t value) {
    if (counts->size == counts->capacity) {
        size_t capacity = counts->capacity ? 2 * counts->capacity : 64;
        int64_t *data = realloc(counts->data, capacity * sizeof(int64_t));
        if (!data) return -1;
        counts->data = data;
        counts->capacity = capacity;
    }
    counts->data[counts->size++] = value;
    return 0;
}

/* The runs of set pixels of one mask, in column-major order (index = x * H + y). */
typedef struct {
    int64_t height;
    Counts counts;       /* zeros, ones, zeros, ... of the closed runs */
    int64_t closed_end;  /* end of the last closed run */
    int64_t run_start, run_end;  /* the open run (run_start == run_end: none) */
    int64_t area;
    int64_t x_min, x_max, y_min, y_max;
} Runs;

static void runs_init(Runs *runs, int64_t height) {
    memset(runs, 0, sizeof(*runs));
    runs->height = height;
    runs->x_min = runs->y_min = INT64_MAX;
    runs->x_max = runs->y_max = -1;
}

/* Sets rows [y_start, y_end) of column x, after every pixel set so far (column-major order);
 * extends the open run when adjacent (a run going on from the bottom of the previous column). */
static int runs_add(Runs *runs, int64_t x, int64_t y_start, int64_t y_end) {
    int64_t start = x * runs->height + y_start, end = x * runs->height + y_end;
    runs->area += end - start;
    if (x < runs->x_min) runs->x_min = x;
    if (x > runs->x_max) runs->x_max = x;
    if (y_start < runs->y_min) runs->y_min = y_start;
    if (y_end - 1 > runs->y_max) runs->y_max = y_end - 1;
    if (runs->run_end == start && runs->run_end > runs->run_start) {
        runs->run_end = end;
        return 0;
    }
    if (runs->run_end > runs->run_start) {
        if (counts_push(&runs->counts, runs->run_start - runs->closed_end) ||
            counts_push(&runs->counts, runs->run_end - runs->run_start))
            return -1;
        runs->closed_end = runs->run_end;
    }
    runs->run_start = start;
    runs->run_end = end;
    return 0;
}

/* Closes the runs: counts as pycocotools writes them (zeros first, a trailing zero run only
 * when the last pixel is not set). */
static int runs_finish(Runs *runs, int64_t num_pixels) {
    if (runs->run_end > runs->run_start) {
        if (counts_push(&runs->counts, runs->run_start - runs->closed_end) ||
            counts_push(&runs->counts, runs->run_end - runs->run_start))
            return -1;
        runs->closed_end = runs->run_end;
    }
    if (runs->closed_end < num_pixels || runs->counts.size == 0)
        return counts_push(&runs->counts, num_pixels - runs->closed_end);
    return 0;
}

/* COCO's compressed RLE text: each count (from the third on, minus the count two before it)
 * in 5-bit groups, low first, 0x20 marking a following group, the last group's 0x10 bit the
 * sign; each group + 48 as one character. Returns the length written (buffer: 13 per count). */
static size_t compress_counts(const Counts *counts, char *text) {
    size_t length = 0;
    for (size_t i = 0; i < counts->size; i++) {
        int64_t value = counts->data[i];
        if (i > 2) value -= counts->data[i - 2];
        int more = 1;
        while (more) {
            int group = (int)(value & 0x1f);
            value >>= 5;  /* arithmetic shift: a negative value ends at -1 */
            more = (group & 0x10) ? value != -1 : value != 0;
            if (more) group |= 0x20;
            text[length++] = (char)(group + 48);
        }
    }
    return length;
}

/* torch's source sample of output index dst along an axis of `in` -> `out` samples. */
typedef struct {
    int i0, i1;
    float l0, l1;
} Tap;

static Tap bilinear_tap(int64_t dst, int in, int64_t out) {
    Tap tap;
    float scale = (float)in / (float)out;
    float src = scale * ((float)dst + 0.5f) - 0.5f;
    if (src < 0.0f) src = 0.0f;
    tap.i0 = (int)src;
    if (tap.i0 > in - 1) tap.i0 = in - 1;
    tap.i1 = tap.i0 + (tap.i0 < in - 1 ? 1 : 0);
    tap.l1 = src - (float)tap.i0;
    if (tap.l1 < 0.0f) tap.l1 = 0.0f;
    if (tap.l1 > 1.0f) tap.l1 = 1.0f;
    tap.l0 = 1.0f - tap.l1;
    return tap;
}

/* Visible rows [start, end) of a crop that read the same source rows i0, i1. */
typedef struct {
    int64_t start, end;
    int i0, i1;
} Segment;

typedef struct {
    Counts counts;
    int64_t area, bbox[4];
} MaskResult;

/* A run of a plan: rows [start, end) of the crop, all set, all clear, or one segment that
 * needs its pixels evaluated (source rows i0, i1). */
enum { ROWS_SET, ROWS_CLEAR, ROWS_MIXED };

typedef struct {
    int kind;
    int64_t start, end;
    int i0, i1;
} PlanItem;

typedef struct {
    int side;           /* S */
    float *padded_t;    /* [S, S]: padded_t[j * S + k] = padded mask at row k, column j */
    Tap *row_taps;      /* per visible row */
    Segment *segments;  /* at most one per visible row */
    PlanItem *plan;     /* at most one per segment */
} Scratch;

/* Largest |value| of the padded mask; infinity when a value is not finite (then every pixel
 * is evaluated). */
static double largest_magnitude(const float *values, int count) {
    double largest = 0.0;
    for (int i = 0; i < count; i++) {
        if (!isfinite(values[i])) return INFINITY;
        double magnitude = fabs((double)values[i]);
        if (magnitude > largest) largest = magnitude;
    }
    return largest;
}

/* The plan of the columns that read source columns (j0, j1): each segment's 2 x 2 source
 * cell is set or clear as a whole when all four corners clear the threshold band, the bilinear
 * value (before rounding) being within the corners' range; neighbouring set (or clear) segments
 * merge. Returns the number of items. */
static int64_t build_plan(const Scratch *scratch, int64_t num_segments, int j0, int j1,
                          double band_low, double band_high) {
    const int side = scratch->side;
    const float *a = scratch->padded_t + (size_t)j0 * side, *b = scratch->padded_t + (size_t)j1 * side;
    PlanItem *plan = scratch->plan;
    int64_t size = 0;
    for (int64_t g = 0; g < num_segments; g++) {
        const Segment *segment = &scratch->segments[g];
        float c00 = a[segment->i0], c01 = b[segment->i0], c10 = a[segment->i1], c11 = b[segment->i1];
        /* Plain comparisons: with a NaN in the mask the band is infinite and nothing is bulk. */
        float low = c00 < c01 ? c00 : c01, high = c00 < c01 ? c01 : c00;
        if (c10 < low) low = c10;
        if (c11 < low) low = c11;
        if (c10 > high) high = c10;
        if (c11 > high) high = c11;
        int kind = (double)low > band_high ? ROWS_SET
                   : (double)high < band_low ? ROWS_CLEAR : ROWS_MIXED;
        if (kind != ROWS_MIXED && size > 0 && plan[size - 1].kind == kind) {
            plan[size - 1].end = segment->end;
        } else {
            plan[size].kind = kind;
            plan[size].start = segment->start;
            plan[size].end = segment->end;
            plan[size].i0 = segment->i0;
            plan[size].i1 = segment->i1;
            size++;
        }
    }
    return size;
}

/* The runs of one detection's mask (`runs` initialised). Returns 0, or -1 out of memory. */
static int paste_runs(const float *mask, int mask_size, const int64_t *box, int64_t height,
                      int64_t width, float threshold, Scratch *scratch, Runs *runs_out) {
    const int side = scratch->side;
    Runs runs = *runs_out;
    int status = -1;
    int64_t x0 = box[0], y0 = box[1], x1 = box[2], y1 = box[3];
    int64_t box_w = x1 - x0 + 1 > 1 ? x1 - x0 + 1 : 1;
    int64_t box_h = y1 - y0 + 1 > 1 ? y1 - y0 + 1 : 1;
    int64_t left = x0 > 0 ? x0 : 0, right = x1 + 1 < width ? x1 + 1 : width;
    int64_t top = y0 > 0 ? y0 : 0, bottom = y1 + 1 < height ? y1 + 1 : height;
    if (left < right && top < bottom) {
        float *padded_t = scratch->padded_t;
        memset(padded_t, 0, sizeof(float) * side * side);
        for (int i = 0; i < mask_size; i++)
            for (int j = 0; j < mask_size; j++)
                padded_t[(j + MASK_PADDING) * side + i + MASK_PADDING] = mask[i * mask_size + j];
        /* A pixel's float32 value is within 3 eps * max|P| of the exact bilinear combination
         * of its cell's corners (two rounded lerps); the band is wider than that. */
        double margin = 8.0 * FLT_EPSILON * largest_magnitude(padded_t, side * side) + 1e-37;
        double band_low = (double)threshold - margin, band_high = (double)threshold + margin;
        /* Visible rows grouped into segments that share their source pair (i0, i1). */
        int64_t rows = bottom - top, num_segments = 0;
        Tap *row_taps = scratch->row_taps;
        Segment *segments = scratch->segments;
        for (int64_t r = 0; r < rows; r++) {
            row_taps[r] = bilinear_tap(top + r - y0, side, box_h);
            if (r == 0 || row_taps[r].i0 != row_taps[r - 1].i0) {
                segments[num_segments].start = r;
                segments[num_segments].i0 = row_taps[r].i0;
                segments[num_segments].i1 = row_taps[r].i1;
                num_segments++;
            }
            segments[num_segments - 1].end = r + 1;
        }
        const PlanItem *plan = scratch->plan;
        int64_t plan_size = 0;
        int plan_j0 = -1;
        for (int64_t x = left; x < right; x++) {
            Tap tx = bilinear_tap(x - x0, side, box_w);
            if (tx.i0 != plan_j0) {  /* columns are visited in order: j0 never decreases */
                plan_size = build_plan(scratch, num_segments, tx.i0, tx.i1, band_low, band_high);
                plan_j0 = tx.i0;
            }
            const float *a = padded_t + (size_t)tx.i0 * side, *b = padded_t + (size_t)tx.i1 * side;
            /* open: first crop row of the column's current run of set pixels, or -1. */
            int64_t open = -1;
            for (int64_t p = 0; p < plan_size; p++) {
                const PlanItem *item = &plan[p];
                if (item->kind == ROWS_SET) {
                    if (open < 0) open = item->start;
                } else if (item->kind == ROWS_CLEAR) {
                    if (open >= 0 && runs_add(&runs, x, top + open, top + item->start)) goto out;
                    open = -1;
                } else {
                    /* torch's order: along x (source rows i0 and i1), then along y. */
                    float va = tx.l0 * a[item->i0] + tx.l1 * b[item->i0];
                    float vb = tx.l0 * a[item->i1] + tx.l1 * b[item->i1];
                    /* Rows between two values on one side of the band (one rounded lerp:
                     * within 1.5 eps (|va| + |vb|) of the exact one) are decided whole. */
                    double lerp_margin =
                        4.0 * FLT_EPSILON * (fabs((double)va) + fabs((double)vb)) + 1e-37;
                    double low = va < vb ? va : vb, high = va < vb ? vb : va;
                    if (low - (double)threshold > lerp_margin) {
                        if (open < 0) open = item->start;
                        continue;
                    }
                    if ((double)threshold - high > lerp_margin) {
                        if (open >= 0 && runs_add(&runs, x, top + open, top + item->start))
                            goto out;
                        open = -1;
                        continue;
                    }
                    for (int64_t r = item->start; r < item->end; r++) {
                        float value = row_taps[r].l0 * va + row_taps[r].l1 * vb;
                        if (value > threshold) {
                            if (open < 0) open = r;
                        } else if (open >= 0) {
                            if (runs_add(&runs, x, top + open, top + r)) goto out;
                            open = -1;
                        }
                    }
                }
            }
            if (open >= 0 && runs_add(&runs, x, top + open, top + rows)) goto out;
        }
    }
    status = runs_finish(&runs, height * width);
out:
    *runs_out = runs;
    return status;
}

/* One detection's mask -> its counts, area and box. Returns 0, or -1 when out of memory. */
static int paste_one(const float *mask, int mask_size, const int64_t *box, int64_t height,
                     int64_t width, float threshold, Scratch *scratch, MaskResult *result) {
    Runs runs;
    runs_init(&runs, height);
    if (paste_runs(mask, mask_size, box, height, width, threshold, scratch, &runs)) {
        free(runs.counts.data);
        return -1;
    }
    result->counts = runs.counts;
    result->area = runs.area;
    if (runs.area > 0) {
        result->bbox[0] = runs.x_min;
        result->bbox[1] = runs.y_min;
        result->bbox[2] = runs.x_max - runs.x_min + 1;
        result->bbox[3] = runs.y_max - runs.y_min + 1;
    } else {
        memset(result->bbox, 0, sizeof(result->bbox));
    }
    return 0;
}

static int check_buffer(Py_buffer *view, const char *name, int ndim, Py_ssize_t itemsize,
                        const char *formats) {
    if (view->ndim != ndim || view->itemsize != itemsize || !view->format ||
        strlen(view->format) != 1 || !strchr(formats, view->format[0])) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected a C-contiguous %d-d array of %zd-byte items (format %s), "
                     "found %d-d, %zd-byte items, format %s",
                     name, ndim, itemsize, formats, view->ndim, view->itemsize,
                     view->format ? view->format : "B");
        return -1;
    }
    return 0;
}

static PyObject *build_results(MaskResult *results, Py_ssize_t num) {
    PyObject *list = PyList_New(num);
    if (!list) return NULL;
    size_t longest = 0;
    for (Py_ssize_t t = 0; t < num; t++)
        if (results[t].counts.size > longest) longest = results[t].counts.size;
    char *text = malloc(13 * longest + 1);
    if (!text) {
        Py_DECREF(list);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t t = 0; t < num; t++) {
        size_t length = compress_counts(&results[t].counts, text);
        const int64_t *bb = results[t].bbox;
        PyObject *item = Py_BuildValue("(s#L[LLLL])", text, (Py_ssize_t)length,
                                       (long long)results[t].area, (long long)bb[0],
                                       (long long)bb[1], (long long)bb[2], (long long)bb[3]);
        if (!item) {
            free(text);
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, t, item);
    }
    free(text);
    return list;
}

static PyObject *paste_rles(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *masks_obj, *boxes_obj;
    long long height, width;
    float threshold;
    if (!PyArg_ParseTuple(args, "OOLLf:paste_rles", &masks_obj, &boxes_obj, &height, &width,
                          &threshold))
        return NULL;
    if (height < 1 || width < 1) {
        PyErr_Format(PyExc_ValueError, "image size %lld x %lld: both must be >= 1", height,
                     width);
        return NULL;
    }
    Py_buffer masks, boxes;
    if (PyObject_GetBuffer(masks_obj, &masks, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)) return NULL;
    if (PyObject_GetBuffer(boxes_obj, &boxes, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)) {
        PyBuffer_Release(&masks);
        return NULL;
    }
    PyObject *output = NULL;
    MaskResult *results = NULL;
    Scratch scratch = {0};
    if (check_buffer(&masks, "masks", 3, 4, "f") || check_buffer(&boxes, "boxes", 2, 8, "lq"))
        goto done;
    Py_ssize_t num = masks.shape[0], mask_size = masks.shape[1];
    if (masks.shape[2] != mask_size || mask_size < 1 || mask_size > 4096) {
        PyErr_Format(PyExc_ValueError, "masks should be [T, M, M] with 1 <= M <= 4096, found "
                     "[%zd, %zd, %zd]", num, mask_size, masks.shape[2]);
        goto done;
    }
    if (boxes.shape[0] != num || boxes.shape[1] != 4) {
        PyErr_Format(PyExc_ValueError, "%zd masks need boxes [%zd, 4], found [%zd, %zd]", num,
                     num, boxes.shape[0], boxes.shape[1]);
        goto done;
    }
    if (height > INT64_MAX / width) {
        PyErr_Format(PyExc_ValueError, "image size %lld x %lld is too large", height, width);
        goto done;
    }
    scratch.side = (int)mask_size + 2 * MASK_PADDING;
    results = calloc(num ? num : 1, sizeof(MaskResult));
    scratch.padded_t = malloc(sizeof(float) * scratch.side * scratch.side);
    scratch.row_taps = malloc(sizeof(Tap) * (size_t)height);
    scratch.segments = malloc(sizeof(Segment) * (size_t)height);
    scratch.plan = malloc(sizeof(PlanItem) * (size_t)height);
    if (!results || !scratch.padded_t || !scratch.row_taps || !scratch.segments ||
        !scratch.plan) {
        PyErr_NoMemory();
        goto done;
    }
    int failed = 0;
    const float *mask_data = masks.buf;
    const int64_t *box_data = boxes.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = 0; t < num && !failed; t++)
        failed = paste_one(mask_data + (size_t)t * mask_size * mask_size, (int)mask_size,
                           box_data + 4 * t, height, width, threshold, &scratch, &results[t]);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    output = build_results(results, num);
done:
    if (results) {
        for (Py_ssize_t t = 0; t < masks.shape[0]; t++) free(results[t].counts.data);
        free(results);
    }
    free(scratch.padded_t);
    free(scratch.row_taps);
    free(scratch.segments);
    free(scratch.plan);
    PyBuffer_Release(&masks);
    PyBuffer_Release(&boxes);
    return output;
}

/* Parses COCO's compressed RLE text into counts (the inverse of compress_counts). Returns 0,
 * -1 out of memory, -2 a character outside '0'..'o', -3 text ending inside a count. */
static int parse_counts(const char *text, Py_ssize_t length, Counts *counts) {
    counts->size = 0;
    Py_ssize_t p = 0;
    while (p < length) {
        int64_t value = 0;
        int shift = 0, more = 1;
        while (more) {
            if (p == length) return -3;
            int group = (unsigned char)text[p++] - 48;
            if (group < 0 || group > 63) return -2;
            if (shift < 63) value |= (int64_t)(group & 0x1f) << shift;
            shift += 5;
            more = group & 0x20;
            if (!more && (group & 0x10) && shift < 64) value |= -((int64_t)1 << shift);
        }
        if (counts->size > 2) value += counts->data[counts->size - 2];
        if (counts_push(counts, value)) return -1;
    }
    return 0;
}

/* Area and box of a mask from its counts, as pycocotools' `area` and `toBbox`: the area sums
 * the runs of ones; the box spans the first and last pixel of every complete (zeros, ones)
 * pair, a run that crosses a column covering every row. */
static void counts_area_bbox(const Counts *counts, int64_t height, int64_t *area,
                             double bbox[4]) {
    *area = 0;
    for (size_t i = 1; i < counts->size; i += 2) *area += counts->data[i];
    size_t pairs_end = counts->size / 2 * 2;
    int64_t x_min = INT64_MAX, x_max = 0, y_min = INT64_MAX, y_max = 0, position = 0;
    int64_t run_x = 0;
    for (size_t j = 0; j < pairs_end; j++) {
        position += counts->data[j];
        int64_t pixel = position - (int64_t)(j % 2);  /* a run's first, then its last, pixel */
        int64_t y = pixel % height, x = pixel / height;
        if (j % 2 == 0) {
            run_x = x;
        } else if (run_x < x) {
            y_min = 0;
            y_max = height - 1;
        }
        if (x < x_min) x_min = x;
        if (x > x_max) x_max = x;
        if (y < y_min) y_min = y;
        if (y > y_max) y_max = y;
    }
    if (pairs_end == 0) {
        bbox[0] = bbox[1] = bbox[2] = bbox[3] = 0.0;
        return;
    }
    bbox[0] = (double)x_min;
    bbox[1] = (double)y_min;
    bbox[2] = (double)(x_max - x_min + 1);
    bbox[3] = (double)(y_max - y_min + 1);
}

static PyObject *rle_area_bbox(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *sequence;
    if (!PyArg_ParseTuple(args, "O:rle_area_bbox", &sequence)) return NULL;
    PyObject *items = PySequence_Fast(sequence, "rle_area_bbox: expected a list of RLE dicts");
    if (!items) return NULL;
    Py_ssize_t num = PySequence_Fast_GET_SIZE(items);
    PyObject *output = PyList_New(num);
    Counts counts = {0};
    if (!output) goto fail;
    for (Py_ssize_t i = 0; i < num; i++) {
        PyObject *rle = PySequence_Fast_GET_ITEM(items, i);
        PyObject *text = PyDict_Check(rle) ? PyDict_GetItemString(rle, "counts") : NULL;
        PyObject *size = PyDict_Check(rle) ? PyDict_GetItemString(rle, "size") : NULL;
        long long height = -1, width = -1;
        PyObject *sides = size ? PySequence_Fast(size, "") : NULL;
        if (sides && PySequence_Fast_GET_SIZE(sides) == 2) {
            height = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(sides, 0));
            width = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(sides, 1));
        }
        Py_XDECREF(sides);
        if (!text || height == -1 || width == -1) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "RLE %zd: expected a dict with 'size' [h, w] and "
                         "compressed 'counts' (str), found %R", i, rle);
            goto fail;
        }
        const char *chars;
        Py_ssize_t length;
        if (PyUnicode_Check(text)) {
            chars = PyUnicode_AsUTF8AndSize(text, &length);
            if (!chars) goto fail;
        } else if (PyBytes_Check(text)) {
            chars = PyBytes_AS_STRING(text);
            length = PyBytes_GET_SIZE(text);
        } else {
            PyErr_Format(PyExc_ValueError, "RLE %zd: 'counts' should be compressed (str or "
                         "bytes), found %s", i, Py_TYPE(text)->tp_name);
            goto fail;
        }
        int status = parse_counts(chars, length, &counts);
        if (status == -1) {
            PyErr_NoMemory();
            goto fail;
        }
        int64_t total = 0;
        for (size_t j = 0; j < counts.size && status == 0; j++) {
            if (counts.data[j] < 0) status = -4;
            total += counts.data[j];
        }
        if (status == 0 && (height < 1 || width < 1 || total != height * width)) status = -5;
        if (status) {
            const char *reasons[] = {"", "", "a character outside '0'..'o'",
                                     "text ending inside a count", "a negative count",
                                     "counts that do not cover h x w pixels"};
            PyErr_Format(PyExc_ValueError, "RLE %zd (size %lld x %lld): %s", i, height, width,
                         reasons[-status]);
            goto fail;
        }
        int64_t area;
        double bbox[4];
        counts_area_bbox(&counts, height, &area, bbox);
        PyObject *item = Py_BuildValue("(L[dddd])", (long long)area, bbox[0], bbox[1], bbox[2],
                                       bbox[3]);
        if (!item) goto fail;
        PyList_SET_ITEM(output, i, item);
    }
    free(counts.data);
    Py_DECREF(items);
    return output;
fail:
    free(counts.data);
    Py_XDECREF(output);
    Py_DECREF(items);
    return NULL;
}

static PyMethodDef methods[] = {
    {"paste_rles", paste_rles, METH_VARARGS,
     "paste_rles(masks [T, M, M] float32, boxes [T, 4] int64, height, width, threshold)\n"
     "-> list of T (compressed COCO RLE counts: str, area: int, bbox: [x, y, w, h]).\n"
     "See the module source for the exact pasting rule."},
    {"rle_area_bbox", rle_area_bbox, METH_VARARGS,
     "rle_area_bbox(rles: list of {'size': [h, w], 'counts': str or bytes})\n"
     "-> list of (area: int, bbox: [x, y, w, h] floats), as pycocotools' area and toBbox."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_mask_rle",
    "The reference's mask pasting straight to compressed COCO RLE (see mask_pasting).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__mask_rle(void) { return PyModule_Create(&module); }
