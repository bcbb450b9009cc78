"""SynthVideoQA: procedurally generated multiple-choice questions about coloured shapes.

    record = generate(seed, index, num_frames=32, task=None, size=128)   # one VideoQARecord
    source = SynthSource(seed, 1000, num_frames=32)                      # len + [i], on the fly

Pure numpy and deterministic: example `index` of `seed` draws everything from
`np.random.default_rng([seed, index])`, so it is identical however many examples
are generated and in whatever order (random access, as grain needs).

Video. `num_frames` (16..256) square RGB frames of `size` pixels at 2 fps (frame i at
i / 2 s). Background: RGB (16, 16, 16) plus independent per-pixel, per-channel
integer noise uniform in [-10, 10], clipped to [0, 255]. Each frame holds exactly one
filled shape of one exact colour (no anti-aliasing, no noise on the shape). The
video is a sequence of events; an event shows one (shape, colour) pair in 1 to 4
consecutive frames; consecutive events differ in shape. Within an event the shape
keeps its size (bounding-box side uniform in [0.3, 0.6] of the frame side) and its
centre moves by at most 5% of the frame side from frame to frame, the whole shape
staying inside the frame.

Geometry. Pixel (row r, column c) has its centre at (x, y) = (c + 0.5, r + 0.5); x
points right, y down. A shape of size s centred at (cx, cy) covers the pixels whose
centre (dx, dy) = (x - cx, y - cy), with h = s / 2, satisfies (`shape_mask`):
  circle    dx² + dy² <= h²
  square    |dx| <= h and |dy| <= h
  triangle  -h <= dy <= h and |dx| <= (dy + h) / 2   (apex (cx, cy - h) up, base on y = cy + h)
  diamond   |dx| + |dy| <= h                          (a square rotated 45 degrees)
  cross     (|dx| <= s/6 and |dy| <= h) or (|dy| <= s/6 and |dx| <= h)   (arms s/3 wide)
  ring      (0.55 h)² < dx² + dy² <= h²               (inner radius 0.55 of the outer)
Every shape's bounding box is [cx - h, cx + h] x [cy - h, cy + h] inside [0, size]².

Tasks (`TASKS`; with task=None, example `index` gets TASKS[index % 4], so any 4
consecutive indices hold one of each):
  color  "What color is the {shape}?"  the shape appears in exactly one event; options:
         4 distinct colours, one correct.
  shape  "Which shape is {color}?"  exactly one event has that colour; options: 4
         distinct shapes, one correct.
  order  "Which appears first?"  options "the {color} {shape}" (2): each pair appears in
         exactly one event, and neither pair's shape nor colour appears in any other event.
  count  "How many times does the {shape} appear?"  the shape appears in 1 to 4 events,
         no two adjacent; options "1", "2", "3", "4" in that order.
Options are shuffled (except `count`); the target is the letter (`record.answer_letter`).

Distractors (a training curriculum; default all shown). With `distractors` = p < 1, each
event that does not answer the question is shown with probability p and otherwise left
blank (background only): p = 0 leaves only the answer events, so the question is one of
perception; raising p towards 1 brings back the events the question must be told apart
from. The visibility draws come from their own stream (`[seed, index, 1]`), so the
events, geometry and noise are those of the full example, and p = 1 is it exactly.
Blanked events have shape and colour -1 in `events`, `frame_shape` and `frame_color`.

Turns (a training aid; default none). With `turns` = n > 0, the question is preceded (as the
record's `preamble`) by k extra question-answer turns, k uniform in 0..n, each a question of
the clip's visible events followed by its answer word ("What color is the ring? red"):
the colour of every shape shown in exactly one event, the shape of every colour shown in
exactly one event, and how many times each shown shape appears (`qa_turns`). As the several
turns of a conversation about one image in VLM instruction tuning, they give a clip k
supervised lookups for the cost of one video (with a loss on the text after the video); the
draws come from their own stream (`[seed, index, 2]`), so everything else is unchanged.
The constraints hold by construction: the answer events are placed first, the other
events are filled from the shapes / colours that cannot break them. Every video
has at least 7 events (the event lengths are drawn the same way for every task),
enough for 4 non-adjacent occurrences.

Ground truth in `record.meta` (arrays survive the TFDS round trip exactly):
  seed, index       int
  frame_shape       (T,) int32 index into SHAPES of each frame's shape
  frame_color       (T,) int32 index into COLORS
  frame_center      (T, 2) float64 shape centre (x, y) in pixels
  frame_size        (T,) float64 shape bounding-box side in pixels
  events            (E, 4) int32 rows (start frame, length, shape, colour)
  answer_frames     (T,) bool, the frames of the events that answer the question
                    (color/shape: the one event; order: both pairs; count: every occurrence)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hybridvlm.data.records import VideoQARecord

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS = ("red", "green", "blue", "yellow", "cyan", "magenta")
# (len(COLORS), 3) uint8 RGB of each colour.
COLOR_RGB = np.array([(220, 40, 40), (40, 190, 60), (50, 90, 230), (230, 210, 40), (40, 200, 210), (210, 60, 210)],
                     dtype=np.uint8)
TASKS = ("color", "shape", "order", "count")
QUESTIONS = {
    "color": "What color is the {shape}?",
    "shape": "Which shape is {color}?",
    "order": "Which appears first?",
    "count": "How many times does the {shape} appear?",
}
COUNT_OPTIONS = ("1", "2", "3", "4")
SPLITS = ("train", "validation", "test")

BACKGROUND = 16  # grey level of the background, before noise
NOISE = 10  # per-pixel, per-channel noise uniform in [-NOISE, NOISE]
FPS = 2.0
MIN_FRAMES, MAX_FRAMES, DEFAULT_FRAMES = 16, 256, 32
MIN_SIZE, DEFAULT_SIZE = 16, 128
SHAPE_SIZE = (0.3, 0.6)  # bounding-box side, fraction of the frame side
MAX_STEP = 0.05  # centre motion between consecutive frames of an event, fraction of the frame side
EVENT_FRAMES = (1, 4)
MIN_EVENTS = 7  # 4 non-adjacent occurrences need 7 events
RING_INNER = 0.55
CROSS_ARM = 1 / 3
# Steps are drawn up to this fraction of MAX_STEP, so float rounding never takes one past 5%.
_STEP_MARGIN = 0.999


def split_seed(base_seed: int, split: str) -> int:
    """The generator seed of a split: 3 * base_seed + (0 train, 1 validation, 2 test).

    Distinct for every (base_seed, split) pair, so splits never share an example.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if base_seed < 0:
        raise ValueError(f"base seed must be >= 0, got {base_seed}")
    return 3 * int(base_seed) + SPLITS.index(split)


def task_of(index: int) -> str:
    """The task of example `index` when none is asked for: TASKS[index % 4]."""
    return TASKS[index % len(TASKS)]


# ----------------------------------------------------------------------------- drawing


def shape_mask(shape: str, center, size: float, frame_size: int) -> np.ndarray:
    """(frame_size, frame_size) bool: the pixels whose centre lies in the shape (module docstring).

    shape: one of SHAPES; center: (x, y) in pixels; size: bounding-box side in pixels.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {SHAPES}")
    cx, cy = float(center[0]), float(center[1])
    h = size / 2
    coords = np.arange(frame_size, dtype=np.float64) + 0.5
    dx = coords[None, :] - cx  # (1, W)
    dy = coords[:, None] - cy  # (H, 1)
    adx, ady = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (adx <= h) & (ady <= h)
    if shape == "triangle":
        return (dy >= -h) & (dy <= h) & (adx <= (dy + h) / 2)
    if shape == "diamond":
        return adx + ady <= h
    if shape == "cross":
        arm = size * CROSS_ARM / 2
        return ((adx <= arm) & (ady <= h)) | ((ady <= arm) & (adx <= h))
    d2 = dx * dx + dy * dy  # ring
    return (d2 <= h * h) & (d2 > (RING_INNER * h) ** 2)


def draw_shape(frame: np.ndarray, shape: str, color: str, center, size: float) -> np.ndarray:
    """Paints `shape` in the exact RGB of `color` onto frame (H, W, 3) uint8 in place; returns it."""
    frame[shape_mask(shape, center, size, frame.shape[0])] = COLOR_RGB[COLORS.index(color)]
    return frame


def background(rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """(num_frames, size, size, 3) uint8: BACKGROUND plus noise in [-NOISE, NOISE], clipped."""
    noise = rng.integers(-NOISE, NOISE + 1, size=(num_frames, size, size, 3), dtype=np.int16)
    return np.clip(noise + BACKGROUND, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- structure


def _event_lengths(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """(E,) int: lengths in 1..4 summing to num_frames, E >= MIN_EVENTS.

    Each length is uniform in 1..4, capped so that the frames left can still give
    the events still needed (one frame each) and cannot overshoot.
    """
    lengths, left = [], num_frames
    while left:
        needed_after = max(0, MIN_EVENTS - len(lengths) - 1)
        high = min(EVENT_FRAMES[1], left - needed_after)
        length = int(rng.integers(EVENT_FRAMES[0], high + 1))
        lengths.append(length)
        left -= length
    return np.array(lengths)


def _fill(rng: np.random.Generator, shapes: np.ndarray, colors: np.ndarray, shape_pool, color_pool) -> None:
    """Assigns every event still at -1: a shape from shape_pool unlike both neighbours, a colour from color_pool.

    Events already set (the answer events) are skipped, and their shapes are kept out
    of their neighbours' choices, so no shape repeats in consecutive events. Filled
    left to right, an event has at most 2 neighbours' shapes to avoid: a pool of >= 3
    shapes always leaves a choice (the pools are 4 to 6 shapes).
    """
    n = len(shapes)
    for i in range(n):
        if shapes[i] >= 0:
            continue
        near = {shapes[i - 1] if i > 0 else -1, shapes[i + 1] if i + 1 < n else -1}
        choices = [s for s in shape_pool if s not in near]
        shapes[i] = rng.choice(choices)
        colors[i] = rng.choice(list(color_pool))


def _others(n: int, *exclude) -> list[int]:
    """range(n) without `exclude`."""
    return [i for i in range(n) if i not in exclude]


def _build_task(rng: np.random.Generator, task: str, num_events: int):
    """Event shapes/colours and the question for one task.

    Returns (shapes (E,) int, colors (E,) int, question, options, answer, answer_events (list of event indices)).
    """
    ns, nc = len(SHAPES), len(COLORS)
    shapes = np.full(num_events, -1, dtype=np.int32)
    colors = np.full(num_events, -1, dtype=np.int32)
    if task == "color":
        k, q, c = int(rng.integers(num_events)), int(rng.integers(ns)), int(rng.integers(nc))
        shapes[k], colors[k] = q, c
        _fill(rng, shapes, colors, _others(ns, q), range(nc))
        choices = [c, *rng.choice(_others(nc, c), 3, replace=False)]
        options = [COLORS[choices[j]] for j in rng.permutation(4)]
        return shapes, colors, QUESTIONS[task].format(shape=SHAPES[q]), options, options.index(COLORS[c]), [k]
    if task == "shape":
        k, s, c = int(rng.integers(num_events)), int(rng.integers(ns)), int(rng.integers(nc))
        shapes[k], colors[k] = s, c
        _fill(rng, shapes, colors, range(ns), _others(nc, c))
        choices = [s, *rng.choice(_others(ns, s), 3, replace=False)]
        options = [SHAPES[choices[j]] for j in rng.permutation(4)]
        return shapes, colors, QUESTIONS[task].format(color=COLORS[c]), options, options.index(SHAPES[s]), [k]
    if task == "order":
        first, second = sorted(int(i) for i in rng.choice(num_events, 2, replace=False))
        (s1, s2), (c1, c2) = rng.choice(ns, 2, replace=False), rng.choice(nc, 2, replace=False)
        shapes[[first, second]], colors[[first, second]] = (s1, s2), (c1, c2)
        _fill(rng, shapes, colors, _others(ns, s1, s2), _others(nc, c1, c2))
        pairs = [f"the {COLORS[c1]} {SHAPES[s1]}", f"the {COLORS[c2]} {SHAPES[s2]}"]
        options = [pairs[j] for j in rng.permutation(2)]
        return shapes, colors, QUESTIONS[task], options, options.index(pairs[0]), [first, second]
    if task == "count":
        n, q = int(rng.integers(1, 5)), int(rng.integers(ns))
        # n non-adjacent events, uniform over such sets: n of E - n + 1 slots, spread by one.
        events = np.sort(rng.choice(num_events - n + 1, n, replace=False)) + np.arange(n)
        shapes[events] = q
        colors[events] = rng.integers(nc, size=n)
        _fill(rng, shapes, colors, _others(ns, q), range(nc))
        return (shapes, colors, QUESTIONS[task].format(shape=SHAPES[q]), list(COUNT_OPTIONS), n - 1,
                [int(e) for e in events])
    raise ValueError(f"task {task!r} is not one of {TASKS}")


def _event_geometry(rng: np.random.Generator, length: int, size: int) -> tuple[np.ndarray, float]:
    """Centres (length, 2) float64 (x, y) and the size (pixels) of one event's shape.

    The centre starts uniform over the positions that keep the shape inside the
    frame; each next frame moves it by a step of uniform direction and length
    in [0, MAX_STEP * size), then clips it back inside (clipping only shortens a step).
    """
    side = float(rng.uniform(*SHAPE_SIZE)) * size
    lo, hi = side / 2, size - side / 2
    centers = np.empty((length, 2))
    centers[0] = rng.uniform(lo, hi, size=2)
    for t in range(1, length):
        angle, step = rng.uniform(0, 2 * np.pi), rng.uniform(0, MAX_STEP * _STEP_MARGIN * size)
        centers[t] = np.clip(centers[t - 1] + step * np.array([np.cos(angle), np.sin(angle)]), lo, hi)
    return centers, side


# ----------------------------------------------------------------------------- records


def qa_turns(shapes: np.ndarray, colors: np.ndarray) -> list[tuple[str, str]]:
    """Every (question, answer word) the visible events answer unambiguously (module doc).

    shapes, colors: (E,) int per event, -1 where blanked. Colour questions for shapes shown
    in exactly one event, shape questions for colours shown in exactly one event, count
    questions (1..4 only: the count options) for every shown shape; in that order.
    """
    shown = shapes >= 0
    s_count = np.bincount(shapes[shown], minlength=len(SHAPES))
    c_count = np.bincount(colors[shown], minlength=len(COLORS))
    out = []
    for s in np.flatnonzero(s_count == 1):
        out.append((QUESTIONS["color"].format(shape=SHAPES[s]), COLORS[colors[shown & (shapes == s)][0]]))
    for c in np.flatnonzero(c_count == 1):
        out.append((QUESTIONS["shape"].format(color=COLORS[c]), SHAPES[shapes[shown & (colors == c)][0]]))
    for s in np.flatnonzero((s_count >= 1) & (s_count <= len(COUNT_OPTIONS))):
        out.append((QUESTIONS["count"].format(shape=SHAPES[s]), COUNT_OPTIONS[s_count[s] - 1]))
    return out


def turns_preamble(seed: int, index: int, shapes: np.ndarray, colors: np.ndarray, turns: int, question: str) -> str:
    """k (uniform in 0..turns) of `qa_turns`, drawn without replacement from stream
    [seed, index, 2], one "question answer" line each (the record's preamble).

    A turn must not give the answer away in text ("Which shape is cyan? cross" before
    "What color is the cross?"), so turns naming the question's shape or colour, in their
    question or their answer, are left out.
    """
    if turns <= 0:
        return ""
    rng = np.random.default_rng([seed, index, 2])
    keys = set(question.rstrip("?").split()) & set(SHAPES + COLORS)
    pairs = [(q, a) for q, a in qa_turns(shapes, colors) if not keys & set(q.rstrip("?").split() + [a])]
    k = min(int(rng.integers(0, turns + 1)), len(pairs))
    pick = rng.permutation(len(pairs))[:k]
    return "".join(f"{pairs[i][0]} {pairs[i][1]}\n" for i in pick)


def check_args(seed: int, num_frames: int, size: int, task: str | None = None, distractors: float = 1.0,
               turns: int = 0) -> None:
    """Raises ValueError naming the argument unless seed >= 0, 16 <= num_frames <= 256,
    size >= 16, task is None or one of TASKS, 0 <= distractors <= 1 and turns >= 0."""
    if turns < 0:
        raise ValueError(f"turns must be >= 0 (the most extra question-answer turns), got {turns}")
    if not 0.0 <= distractors <= 1.0:
        raise ValueError(f"distractors must be in [0, 1] (the share of non-answer events shown), got {distractors}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not MIN_FRAMES <= num_frames <= MAX_FRAMES:
        raise ValueError(f"num_frames must be in [{MIN_FRAMES}, {MAX_FRAMES}], got {num_frames}")
    if size < MIN_SIZE:
        raise ValueError(f"frame size must be >= {MIN_SIZE} pixels, got {size}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")


def generate(seed: int, index: int, *, num_frames: int = DEFAULT_FRAMES, task: str | None = None,
             size: int = DEFAULT_SIZE, distractors: float = 1.0, turns: int = 0) -> VideoQARecord:
    """Example `index` of `seed`: a VideoQARecord with frames (num_frames, size, size, 3) uint8.

    task: one of TASKS, or None for TASKS[index % 4]. The uid is "synth/{seed}/{index}".
    distractors: the probability that each non-answer event is shown (see the module doc).
    turns: the most extra question-answer turns before the question (see the module doc).
    Raises ValueError for a negative seed or index, or arguments `check_args` refuses.
    """
    seed, index, num_frames, size = int(seed), int(index), int(num_frames), int(size)
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    check_args(seed, num_frames, size, task, distractors, turns)
    task = task_of(index) if task is None else task
    rng = np.random.default_rng([seed, index])

    lengths = _event_lengths(rng, num_frames)
    shapes, colors, question, options, answer, answer_events = _build_task(rng, task, len(lengths))
    if distractors < 1.0:
        hidden = np.random.default_rng([seed, index, 1]).random(len(lengths)) >= distractors
        hidden[answer_events] = False
        shapes, colors = np.where(hidden, -1, shapes), np.where(hidden, -1, colors)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    events = np.stack([starts, lengths, shapes, colors], axis=1).astype(np.int32)

    frame_center = np.empty((num_frames, 2))
    frame_size = np.empty(num_frames)
    for start, length in zip(starts, lengths):
        frame_center[start:start + length], frame_size[start:start + length] = _event_geometry(rng, length, size)
    frame_shape = np.repeat(shapes, lengths).astype(np.int32)
    frame_color = np.repeat(colors, lengths).astype(np.int32)
    answer_frames = np.zeros(num_frames, dtype=bool)
    for e in answer_events:
        answer_frames[starts[e]:starts[e] + lengths[e]] = True

    frames = background(rng, num_frames, size)
    for t in range(num_frames):
        if frame_shape[t] >= 0:
            draw_shape(frames[t], SHAPES[frame_shape[t]], COLORS[frame_color[t]], frame_center[t], frame_size[t])

    meta = dict(seed=seed, index=index, frame_shape=frame_shape, frame_color=frame_color,
                frame_center=frame_center, frame_size=frame_size, events=events, answer_frames=answer_frames)
    return VideoQARecord(uid=f"synth/{seed}/{index}", question=question, options=tuple(options), answer=int(answer),
                         task=task, preamble=turns_preamble(seed, index, shapes, colors, turns, question),
                         frames=frames, timestamps=np.arange(num_frames, dtype=np.float64) / FPS,
                         meta=meta)


class SynthSource:
    """A random-access source of `num_examples` SynthVideoQA records, generated on demand.

    len(source) == num_examples; source[i] == generate(seed, i, num_frames=F(i), ...), with
    F(i) = num_frames, or num_frames[i % len(num_frames)] for a mix of video lengths (every
    index has one length, so no two examples share their draws). Picklable (plain
    attributes), so grain workers can hold it. `split_seed(base, split)` gives the seed of a
    prepared TFDS split, whose records this reproduces exactly.
    """

    def __init__(self, seed: int, size: int, num_frames: int | Sequence[int] = DEFAULT_FRAMES, *,
                 frame_size: int = DEFAULT_SIZE, task: str | Sequence[str] | None = None, distractors: float = 1.0,
                 turns: int = 0):
        """seed: generator seed; size: number of examples; num_frames: frames per video (16..256),
        or several lengths taken in turn; frame_size: frame side in pixels; task: one task for
        all, several taken in turn (example i gets task[i % len(task)]), or None (TASKS[i % 4]);
        distractors: the share of non-answer events shown; turns: the most extra
        question-answer turns before each question."""
        if size < 0:
            raise ValueError(f"size (number of examples) must be >= 0, got {size}")
        lengths = (num_frames,) if np.ndim(num_frames) == 0 else tuple(num_frames)
        if not lengths:
            raise ValueError("num_frames: give at least one video length")
        tasks = (task,) if task is None or isinstance(task, str) else tuple(task)
        if not tasks:
            raise ValueError("task: give at least one task (or None for all)")
        for n in lengths:
            for t in tasks:
                check_args(seed, n, frame_size, t, distractors, turns)
        self.seed, self.size = int(seed), int(size)
        self.lengths = tuple(int(n) for n in lengths)
        self.frame_size, self.task, self.distractors = int(frame_size), task, float(distractors)
        self.turns = int(turns)
        self._tasks = tasks

    @property
    def num_frames(self) -> int:
        """The longest video's frames."""
        return max(self.lengths)

    def frames_of(self, index: int) -> int:
        """Frames of example `index`'s video."""
        return self.lengths[index % len(self.lengths)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> VideoQARecord:
        i = int(index)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        return generate(self.seed, i, num_frames=self.frames_of(i), task=self._tasks[i % len(self._tasks)],
                        size=self.frame_size,
                        distractors=self.distractors, turns=self.turns)

    def __repr__(self) -> str:
        frames = self.lengths[0] if len(self.lengths) == 1 else self.lengths
        return (f"SynthSource(seed={self.seed}, size={self.size}, num_frames={frames}, "
                f"frame_size={self.frame_size}, task={self.task!r}, distractors={self.distractors}, "
                f"turns={self.turns})")
