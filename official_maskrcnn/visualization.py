"""Drawing detections on an image: translucent masks, box outlines, "name score" labels.

Shape shorthand: H x W the image, T detections. Boxes are [x1, y1, x2, y2] in pixels of the image
with the reference's inclusive corners (x2 is the last covered column), as `coco_results`
produces them. Pure numpy + Pillow (no TensorFlow), so it can be used from any process.

Drawing order: instance t is painted after instances 0..t-1, i.e. later instances are on top
(masks blend over earlier ones, outlines and labels cover them).
"""

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours that stay visible on natural images and on each other (Sasha
# Trubetskoy's "20 distinct colours", the 16 most distinct, white / black / greys left out).
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (128, 0, 0), (170, 255, 195), (0, 0, 128),
)
DEFAULT_ALPHA = 0.45  # mask opacity: the object stays visible under its colour
# Label text is black on colours brighter than this (ITU-R BT.601 luma), white otherwise.
DARK_TEXT_ABOVE_LUMA = 150
LABEL_PADDING = 1  # pixels of label background around the text


def color_for(index):
    """The palette colour of instance `index` (cycles after len(PALETTE)): (r, g, b) ints."""
    return PALETTE[int(index) % len(PALETTE)]


def format_label(name, score):
    """The label text of a detection, e.g. "ellipse 0.87"."""
    return f"{name} {float(score):.2f}"


def default_line_width(height, width):
    """Box outline width: 1 px on thumbnails, ~2 px at COCO sizes, 4 px at 800 x 1333."""
    return max(1, round(min(height, width) / 200))


@functools.lru_cache(maxsize=16)
def label_font(size):
    """Pillow's built-in font at `size` px (FreeType); the fixed bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def blend_masks(image, masks, colors, alpha=DEFAULT_ALPHA):
    """Each mask's pixels mixed with its colour: (1 - alpha) * pixel + alpha * colour.

    Args:
      image: [H, W, 3] uint8.
      masks: [T, H, W] bool or 0/1 integers.
      colors: T (r, g, b) triples.
      alpha: opacity of the colour in [0, 1].
    Returns:
      [H, W, 3] uint8, a new array (overlaps: later masks blend over the earlier result).
    """
    blended = np.asarray(image, np.float32).copy()
    for mask, color in zip(masks, colors):
        inside = np.asarray(mask).astype(bool)
        blended[inside] = (1.0 - alpha) * blended[inside] + alpha * np.asarray(color, np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _draw_label(draw, text, x, y_top, color, font, image_size):
    """A filled label box in `color` with `text`, above (x, y_top), or inside the top of the box
    when there is no room above; kept inside the image."""
    width, height = image_size
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    box_w = right - left + 2 * LABEL_PADDING
    box_h = bottom - top + 2 * LABEL_PADDING
    x0 = min(max(int(x), 0), max(width - box_w, 0))
    y0 = int(y_top) - box_h if int(y_top) - box_h >= 0 else max(int(y_top), 0)
    y0 = min(y0, max(height - box_h, 0))
    draw.rectangle([x0, y0, x0 + box_w - 1, y0 + box_h - 1], fill=tuple(color))
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    text_color = (0, 0, 0) if luma > DARK_TEXT_ABOVE_LUMA else (255, 255, 255)
    draw.text((x0 + LABEL_PADDING - left, y0 + LABEL_PADDING - top), text, fill=text_color,
              font=font)


def draw_detections(image, boxes_xyxy, masks, labels=None, colors=None, alpha=DEFAULT_ALPHA,
                    line_width=None, font_size=None):
    """The image with every detection drawn: mask blended in its colour, box outline, label.

    Args:
      image: [H, W, 3] uint8 RGB (not modified).
      boxes_xyxy: [T, 4] float [x1, y1, x2, y2], inclusive corners, in pixels of `image`;
        rounded to the nearest pixel for drawing.
      masks: [T, H, W] bool or 0/1 integers (None: no masks drawn).
      labels: T strings drawn on a filled background in the instance's colour above its box
        (None or "": no label).
      colors: T (r, g, b) triples; None: `color_for(t)` for instance t.
      alpha: mask opacity in [0, 1].
      line_width: outline width in pixels (None: `default_line_width`); drawn inward from the
        box edges, so the outermost outline pixels are the box's own corners.
      font_size: label text height in pixels (None: about 1/40 of the shorter side, >= 10).
    Returns:
      [H, W, 3] uint8, a new array; T = 0 gives a copy of `image`.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image should be [H, W, 3] uint8, found {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    num = boxes.shape[0]
    colors = [color_for(t) for t in range(num)] if colors is None else list(colors)
    labels = [""] * num if labels is None else list(labels)
    if len(colors) != num or len(labels) != num:
        raise ValueError(f"{num} boxes but {len(colors)} colors and {len(labels)} labels")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != (num, height, width):
            raise ValueError(f"masks should be [T, H, W] = {(num, height, width)}, found "
                             f"{masks.shape}")
    if num == 0:
        return image.copy()
    drawn = blend_masks(image, masks, colors, alpha) if masks is not None else image.copy()
    canvas = Image.fromarray(drawn)
    draw = ImageDraw.Draw(canvas)
    line_width = line_width or default_line_width(height, width)
    font = label_font(font_size or max(10, round(min(height, width) / 40)))
    for box, color, label in zip(np.rint(boxes).astype(np.int64).tolist(), colors, labels):
        x1, y1, x2, y2 = box
        if x2 < x1 or y2 < y1:
            continue  # degenerate box: its mask (if any) is drawn, no outline
        draw.rectangle([x1, y1, x2, y2], outline=tuple(color), width=line_width)
        if label:
            _draw_label(draw, label, x1, y1, color, font, (width, height))
    return np.asarray(canvas).copy()


def draw_scored_detections(image, boxes_xyxy, masks, labels, scores, class_names):
    """The picture of a model's detections (`predict`, the TensorBoard eval images): each drawn
    with its mask, box and "name score", colours by rank (the best detection gets
    `color_for(0)`) and the best drawn last, on top.

    Args:
      image: [H, W, 3] uint8 RGB (not modified).
      boxes_xyxy: [T, 4] [x1, y1, x2, y2] inclusive pixels of `image`, by decreasing score
        (the model's order).
      masks: [T, H, W] bool or 0/1 integers.
      labels: [T] int model labels (1..K-1).
      scores: [T] float.
      class_names: {label: name}; a label without one is drawn as "class <label>".
    Returns:
      [H, W, 3] uint8, a new array.
    """
    order = np.arange(len(scores))[::-1]
    texts = [format_label(class_names.get(int(label), f"class {label}"), score)
             for label, score in zip(labels, scores)]
    return draw_detections(image, np.asarray(boxes_xyxy).reshape(-1, 4)[order],
                           np.asarray(masks)[order], [texts[t] for t in order],
                           [color_for(t) for t in order])
