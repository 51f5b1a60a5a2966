"""Synthetic captioned shapes: the embedded default dataset (no download) and its evaluator.

Each example is one or two shapes ({circle, square, triangle} in six well-separated colours) on a
plain light background, with a caption that names them and, for two shapes, their spatial
relation: "a red circle", "a green triangle to the left of a yellow circle".

Everything is a pure function of the example index, so any host regenerates identical data:
  `sample_spec(split, index)` -> `Spec`; `render(spec, size)` -> uint8 [S, S, 3];
  `caption(spec)` -> str; `parse_caption(text)` -> `Spec` (no geometry);
  `detect(image)` -> list of `Detection`; `adheres(text, image)` -> bool (the evaluation metric).

Held-out captions (the `validation` split). A two-shape *scene* is (axis, first, second): the
object (colour, shape) on the left/top, the one on the right/bottom, axis horizontal or vertical.
Scene `(axis, a, b)` with object indices a = 3 * colour + shape is held out iff
`(a + 2 * b + 5 * axis) % 9 == 0` (72 of the 612 scenes, about 12 %). `train` never contains a
held-out scene in either wording ("A left of B" / "B right of A"); `validation` contains only
held-out scenes. Every single object and every relation still appears in `train`, so validation
measures compositional generalisation to unseen object/relation combinations.

Images are drawn with PIL at 4x the largest stored size (at most 1024 px) and area-downsampled
(box filter) to each size, which anti-aliases the edges.
"""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
PALETTE = np.array(
    [(215, 30, 40), (250, 130, 0), (240, 220, 30), (30, 160, 50), (30, 80, 230), (130, 50, 190)],
    np.float32,
)
SHAPES = ("circle", "square", "triangle")
# Relation of objects[0] to objects[1]; 0 = a single object.
RELATIONS = ("", "to the left of", "to the right of", "above", "below")
NONE, LEFT, RIGHT, ABOVE, BELOW = range(5)
BACKGROUND = np.array((245, 245, 240), np.float32)
NUM_OBJECTS = len(COLORS) * len(SHAPES)
MAX_OBJECTS = 2
SUPERSAMPLE = 4
MAX_CANVAS = 1024
SINGLE_PROB = 0.25
SEED = 20240601
_SPLIT_CODES = {"train": 0, "validation": 1}


class Spec(NamedTuple):
    """A scene. Geometry is in image fractions; `boxes` is empty for a parsed caption.

    colors, shapes: tuples of indices into COLORS / SHAPES, in caption order.
    relation: index into RELATIONS (objects[0] relative to objects[1]); NONE for one object.
    boxes: per object (cx, cy, size): the bounding-box centre and side.
    """

    colors: tuple[int, ...]
    shapes: tuple[int, ...]
    relation: int
    boxes: tuple[tuple[float, float, float], ...] = ()


class Detection(NamedTuple):
    color: int
    shape: int
    centroid: tuple[float, float]  # (x, y) of the pixel mass, in image fractions


def is_heldout(axis: int, first: int, second: int) -> bool:
    """Whether scene (axis 0 horizontal / 1 vertical, left-or-top, right-or-bottom) is held out."""
    return (first + 2 * second + 5 * axis) % 9 == 0


HELDOUT_SCENES = tuple(
    (x, a, b)
    for x in range(2) for a in range(NUM_OBJECTS) for b in range(NUM_OBJECTS)
    if a != b and is_heldout(x, a, b)
)


def _scene_of(spec: Spec) -> tuple[int, int, int] | None:
    """(axis, first, second) of a two-object spec, None for one object."""
    if spec.relation == NONE:
        return None
    a = spec.colors[0] * len(SHAPES) + spec.shapes[0]
    b = spec.colors[1] * len(SHAPES) + spec.shapes[1]
    return {LEFT: (0, a, b), RIGHT: (0, b, a), ABOVE: (1, a, b), BELOW: (1, b, a)}[spec.relation]


def is_heldout_spec(spec: Spec) -> bool:
    scene = _scene_of(spec)
    return scene is not None and is_heldout(*scene)


def layout(colors: Sequence[int], shapes: Sequence[int], relation: int,
           rng: np.random.Generator) -> Spec:
    """Samples positions and sizes consistent with the relation (non-overlapping shapes).

    For a pair, the first object sits in one half and the second in the other, separated by a
    gap, and the offset along the other axis is at most 0.6x the offset along the relation axis,
    so the relation is unambiguous from the centroids.
    """
    if relation == NONE:
        s = rng.uniform(0.3, 0.6)
        cx, cy = rng.uniform(0.05 + s / 2, 0.95 - s / 2, size=2)
        return Spec(tuple(colors), tuple(shapes), NONE, ((float(cx), float(cy), float(s)),))
    sizes = rng.uniform(0.24, 0.36, size=2)
    # Along the relation axis: object "lo" (left/top) in [0, 0.5), "hi" in (0.5, 1].
    lo_first = relation in (LEFT, ABOVE)
    s_lo, s_hi = (sizes[0], sizes[1]) if lo_first else (sizes[1], sizes[0])
    for _ in range(20):
        p_lo = rng.uniform(0.04 + s_lo / 2, 0.46 - s_lo / 2)
        p_hi = rng.uniform(0.54 + s_hi / 2, 0.96 - s_hi / 2)
        q_lo = rng.uniform(0.04 + s_lo / 2, 0.96 - s_lo / 2)
        q_hi = rng.uniform(0.04 + s_hi / 2, 0.96 - s_hi / 2)
        if abs(q_hi - q_lo) <= 0.6 * (p_hi - p_lo):
            break
    else:
        q_lo = q_hi = 0.5
    if relation in (LEFT, RIGHT):
        lo, hi = (p_lo, q_lo, s_lo), (p_hi, q_hi, s_hi)
    else:
        lo, hi = (q_lo, p_lo, s_lo), (q_hi, p_hi, s_hi)
    boxes = (lo, hi) if lo_first else (hi, lo)
    boxes = tuple(tuple(float(v) for v in b) for b in boxes)
    return Spec(tuple(colors), tuple(shapes), relation, boxes)


def sample_spec(split: str, index: int) -> Spec:
    """The deterministic scene of example `index` of `split` ("train" or "validation")."""
    rng = np.random.default_rng([SEED, _SPLIT_CODES[split], index])
    if split == "train":
        if rng.uniform() < SINGLE_PROB:
            obj = int(rng.integers(NUM_OBJECTS))
            return layout((obj // 3,), (obj % 3,), NONE, rng)
        while True:
            a, b = (int(v) for v in rng.choice(NUM_OBJECTS, size=2, replace=False))
            axis = int(rng.integers(2))
            if not is_heldout(axis, a, b):
                break
    else:
        axis, a, b = HELDOUT_SCENES[int(rng.integers(len(HELDOUT_SCENES)))]
    # Both wordings of a scene: "a <rel> b" (left / above) or "b <inverse rel> a" (right / below).
    if rng.uniform() < 0.5:
        objs, relation = (a, b), (LEFT, ABOVE)[axis]
    else:
        objs, relation = (b, a), (RIGHT, BELOW)[axis]
    return layout([o // 3 for o in objs], [o % 3 for o in objs], relation, rng)


def caption(spec: Spec) -> str:
    names = [f"{'an' if COLORS[c][0] in 'aeiou' else 'a'} {COLORS[c]} {SHAPES[s]}"
             for c, s in zip(spec.colors, spec.shapes)]
    if spec.relation == NONE:
        return names[0]
    return f"{names[0]} {RELATIONS[spec.relation]} {names[1]}"


_OBJ = rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_CAPTION_RE = re.compile(rf"^\s*{_OBJ}(?:\s+({'|'.join(RELATIONS[1:])})\s+{_OBJ})?\s*\.?\s*$")


def parse_caption(text: str) -> Spec | None:
    """Inverse of `caption` (no geometry); None when the text is not a shapes caption."""
    m = _CAPTION_RE.match(text.lower())
    if m is None:
        return None
    c0, s0, rel, c1, s1 = m.groups()
    if rel is None:
        return Spec((COLORS.index(c0),), (SHAPES.index(s0),), NONE)
    return Spec((COLORS.index(c0), COLORS.index(c1)), (SHAPES.index(s0), SHAPES.index(s1)),
                RELATIONS.index(rel))


def render_multi(spec: Spec, sizes: Sequence[int]) -> dict[int, np.ndarray]:
    """Draws once at SUPERSAMPLE x the largest size and box-filters down to every size."""
    canvas = min(SUPERSAMPLE * max(sizes), MAX_CANVAS)
    img = Image.new("RGB", (canvas, canvas), tuple(int(v) for v in BACKGROUND))
    draw = ImageDraw.Draw(img)
    for c, s, (cx, cy, size) in zip(spec.colors, spec.shapes, spec.boxes):
        x0, y0 = (cx - size / 2) * canvas, (cy - size / 2) * canvas
        x1, y1 = (cx + size / 2) * canvas, (cy + size / 2) * canvas
        fill = tuple(int(v) for v in PALETTE[c])
        if SHAPES[s] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif SHAPES[s] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # apex up, base = height = size: fills half its bounding box
            draw.polygon(((cx * canvas, y0), (x1, y1), (x0, y1)), fill=fill)
    return {
        s: np.asarray(img if s == canvas else img.resize((s, s), Image.BOX), np.uint8)
        for s in sizes
    }


def render(spec: Spec, size: int) -> np.ndarray:
    """uint8 [size, size, 3] image of `spec` (anti-aliased)."""
    return render_multi(spec, (size,))[size]


# ----------------------------------------------------------------------------------- detector

_FG_DIST = 50.0  # RGB distance from the background that counts as foreground


def detect(image: np.ndarray, min_area_frac: float = 0.008) -> list[Detection]:
    """Finds shapes in a uint8 [S, S, 3] image (rendered or generated).

    Segments pixels far from the background (the median border colour), labels connected
    components, names each by the palette colour nearest to its core pixels, and classifies the
    shape by the coverage of its bounding box (square ~1, circle ~pi/4, triangle ~1/2), with
    coverage and extents measured on soft (anti-aliased) alpha for sub-pixel accuracy.
    """
    from scipy import ndimage  # a jax dependency; imported lazily (only evaluation needs it)

    img = np.asarray(image, np.float32)
    size = img.shape[0]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    labels, n = ndimage.label(dist > _FG_DIST, structure=np.ones((3, 3)))
    out = []
    for k in range(1, n + 1):
        comp = labels == k
        if comp.sum() < min_area_frac * size * size:
            continue
        d = dist[comp]
        core = img[comp][d >= 0.8 * np.percentile(d, 90)]
        color = int(np.argmin(np.linalg.norm(PALETTE - core.mean(0), axis=-1)))
        # Soft coverage of the chosen colour over the component grown by one pixel.
        region = ndimage.binary_dilation(comp, np.ones((3, 3))) & ((labels == 0) | comp)
        ref = PALETTE[color] - bg
        alpha = np.clip((img - bg) @ ref / (ref @ ref), 0.0, 1.0) * region
        area = alpha.sum()
        if area <= 1e-6:  # far from the background but not towards the nearest palette colour
            continue
        width, height = alpha.max(0).sum(), alpha.max(1).sum()
        fill = area / max(width * height, 1e-6)
        shape = 2 if fill < 0.65 else (0 if fill < 0.9 else 1)
        ys, xs = np.mgrid[:size, :size]
        cx, cy = (alpha * xs).sum() / area, (alpha * ys).sum() / area
        out.append(Detection(color, shape, (float((cx + 0.5) / size), float((cy + 0.5) / size))))
    return out


def relation_of(first: Detection, second: Detection) -> int:
    """The relation of `first` to `second` along the dominant axis of their centroid offset."""
    dx = first.centroid[0] - second.centroid[0]
    dy = first.centroid[1] - second.centroid[1]
    if abs(dx) >= abs(dy):
        return LEFT if dx < 0 else RIGHT
    return ABOVE if dy < 0 else BELOW


def matches(spec: Spec, detections: Sequence[Detection]) -> bool:
    """Exactly the spec's objects (colour and shape), and its relation if it has one."""
    if len(detections) != len(spec.colors):
        return False
    by_object = {(d.color, d.shape): d for d in detections}
    wanted = list(zip(spec.colors, spec.shapes))
    if len(by_object) != len(detections) or set(by_object) != set(wanted):
        return False
    if spec.relation == NONE:
        return True
    return relation_of(by_object[wanted[0]], by_object[wanted[1]]) == spec.relation


def adheres(text: str, image: np.ndarray) -> bool:
    """Whether `image` shows what the shapes caption `text` says (False for other text)."""
    spec = parse_caption(text)
    return spec is not None and matches(spec, detect(image))


# ------------------------------------------------------------------------------- tfds builder

@dataclasses.dataclass(eq=False, kw_only=True)
class ShapesConfig(tfds.core.BuilderConfig):
    """sizes: stored resolutions (features `image_<size>`); split sizes in examples."""

    sizes: tuple[int, ...] = (32, 64)
    num_train: int = 20_000
    num_validation: int = 1_000


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Captioned one- or two-shape scenes; see the module docstring. Generated, never downloaded.

    Configs: "64" stores image_32 + image_64 (base model and 32->64 upsampler); "256" stores
    image_64 + image_256 (64->256 upsampler; fewer examples, 200 KB each). Custom sizes:
    `SyntheticShapes(config=ShapesConfig(name="tiny", num_train=64, ...))`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="64", sizes=(32, 64), num_train=20_000, num_validation=1_000),
        ShapesConfig(name="256", sizes=(64, 256), num_train=5_000, num_validation=500),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # No checksums file to find; tfds' lookup of one needs `importlib_resources`.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        features = {
            f"image_{s}": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding="bytes")
            for s in cfg.sizes
        }
        features.update(
            caption=tfds.features.Text(),
            colors=tfds.features.Tensor(shape=(MAX_OBJECTS,), dtype=np.int32),  # -1 = absent
            shapes=tfds.features.Tensor(shape=(MAX_OBJECTS,), dtype=np.int32),
            relation=tfds.features.Tensor(shape=(), dtype=np.int32),
            boxes=tfds.features.Tensor(shape=(MAX_OBJECTS, 3), dtype=np.float32),
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(features),
            homepage="https://github.com/openai/glide-text2im",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_validation),
        }

    def _generate_examples(self, split: str, num: int):
        sizes = self.builder_config.sizes
        for i in range(num):
            spec = sample_spec(split, i)
            yield i, example(spec, sizes)


def example(spec: Spec, sizes: Sequence[int]) -> dict[str, np.ndarray | str]:
    """The stored feature dict of one scene."""
    n = len(spec.colors)
    pad = MAX_OBJECTS - n
    ex = {f"image_{s}": img for s, img in render_multi(spec, sizes).items()}
    ex.update(
        caption=caption(spec),
        colors=np.array(list(spec.colors) + [-1] * pad, np.int32),
        shapes=np.array(list(spec.shapes) + [-1] * pad, np.int32),
        relation=np.int32(spec.relation),
        boxes=np.array(list(spec.boxes) + [(0.0, 0.0, 0.0)] * pad, np.float32),
    )
    return ex
