"""SynthVideoQA's generator (hybridvlm.data.synth) against its spec: pixels, geometry,
events, the four tasks' uniqueness rules and answers (recomputed here from the ground
truth in `meta`, not through the generator's own logic), determinism, random access."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest

from hybridvlm.data import synth
from hybridvlm.data.records import DEFAULT_INSTRUCTION, LETTERS

SPEC_COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40),
               "cyan": (40, 200, 210), "magenta": (210, 60, 210)}
SPEC_SHAPES = {"circle", "square", "triangle", "diamond", "cross", "ring"}
# Frame counts for the structural checks: both ends of 16..256 and odd ones between.
FRAME_COUNTS = (16, 17, 31, 64, 255, 256)
SEEDS = (0, 1, 7, 12345)


def _records(num_frames: int, per_seed: int, size: int = 16) -> list:
    # The structure (events, question, answer) draws the same numbers whatever the frame size,
    # so small frames test it cheaply.
    return [synth.generate(seed, i, num_frames=num_frames, size=size) for seed in SEEDS for i in range(per_seed)]


@pytest.fixture(scope="module")
def structure() -> dict:
    """num_frames -> records of all tasks (16 px frames)."""
    return {t: _records(t, 24 if t < 200 else 12) for t in FRAME_COUNTS}


@pytest.fixture(scope="module")
def full_size() -> list:
    """Records at the released 128x128 size."""
    return [synth.generate(5, i, num_frames=32) for i in range(8)] + [synth.generate(6, 3, num_frames=256)]


def _events(record) -> list[tuple[int, int, str, str]]:
    """(start, length, shape name, colour name) of each event, from meta."""
    return [(int(s), int(n), synth.SHAPES[sh], synth.COLORS[c]) for s, n, sh, c in record.meta["events"]]


def _frames_of(events, chosen) -> np.ndarray:
    total = events[-1][0] + events[-1][1]
    mask = np.zeros(total, dtype=bool)
    for e in chosen:
        mask[events[e][0]:events[e][0] + events[e][1]] = True
    return mask


# ----------------------------------------------------------------------------- constants and pixels


def test_constants_are_the_spec():
    assert set(synth.SHAPES) == SPEC_SHAPES and len(synth.SHAPES) == 6
    assert {c: tuple(int(v) for v in synth.COLOR_RGB[i]) for i, c in enumerate(synth.COLORS)} == SPEC_COLORS
    assert synth.TASKS == ("color", "shape", "order", "count")


def test_background_is_16_plus_noise_in_pm10_and_shapes_are_exact_colours(full_size):
    values = []
    for rec in full_size:
        m = rec.meta
        for t, frame in enumerate(rec.frames):
            mask = synth.shape_mask(synth.SHAPES[m["frame_shape"][t]], m["frame_center"][t], m["frame_size"][t], 128)
            assert mask.sum() > 0
            assert (frame[mask] == synth.COLOR_RGB[m["frame_color"][t]]).all()
            values.append(frame[~mask])
    bg = np.concatenate(values).astype(np.int32)  # (N, 3)
    assert bg.min() == 6 and bg.max() == 26  # 16 + [-10, 10], every value reached
    assert set(np.unique(bg)) == set(range(6, 27))
    assert abs(bg.mean() - 16) < 0.05
    # independent per channel: R == G == B would hold for 1/441 of the pixels
    assert (bg[:, 0] == bg[:, 1]).mean() < 0.1 and ((bg[:, 0] == bg[:, 1]) & (bg[:, 1] == bg[:, 2])).mean() < 0.01
    # no shape colour is near the background: a pixel belongs to the shape iff it is bright
    assert synth.COLOR_RGB.max(axis=1).min() > 26


def test_each_frame_holds_one_shape_of_its_ground_truth_colour(full_size):
    for rec in full_size:
        for t, frame in enumerate(rec.frames):
            bright = (frame > 26).any(axis=-1)
            assert bright.sum() > 0 and (frame[bright] == synth.COLOR_RGB[rec.meta["frame_color"][t]]).all()


# ----------------------------------------------------------------------------- geometry

S, SIDE, CX, CY = 256, 150.0, 128.3, 127.6
H = SIDE / 2


def _mask(shape):
    return synth.shape_mask(shape, (CX, CY), SIDE, S)


def _centres(mask):
    rows, cols = np.nonzero(mask)
    return cols + 0.5 - CX, rows + 0.5 - CY  # dx, dy of the covered pixel centres


def _row_width(mask, dy):
    """Covered pixels in the row whose centre is at CY + dy."""
    return int(mask[int(np.floor(CY + dy))].sum())


@pytest.mark.parametrize("shape", synth.SHAPES)
def test_every_shape_lies_in_its_bounding_box(shape):
    dx, dy = _centres(_mask(shape))
    assert np.abs(dx).max() <= H and np.abs(dy).max() <= H
    # and spans most of it (the bounding-box side is the size)
    assert dx.max() - dx.min() > SIDE - 2.5 and dy.max() - dy.min() > SIDE - 2.5


def test_circle_and_square():
    circle, square = _mask("circle"), _mask("square")
    dx, dy = _centres(circle)
    assert (dx ** 2 + dy ** 2 <= H ** 2).all()
    assert abs(circle.sum() / (np.pi * H ** 2) - 1) < 0.01
    assert abs(square.sum() / SIDE ** 2 - 1) < 0.02
    assert square[int(CY - H + 1), int(CX + H - 1)]  # a corner is covered


def test_triangle_points_up_with_a_horizontal_base():
    tri = _mask("triangle")
    rows = np.nonzero(tri.any(axis=1))[0]
    widths = tri[rows].sum(axis=1)
    assert (np.diff(widths) >= 0).all()  # widening downwards: apex up
    assert widths[0] <= 3 and widths[-1] >= SIDE - 2  # apex; full-width base (bottom row)
    cols = np.nonzero(tri[rows[0]])[0]
    assert abs(cols.mean() + 0.5 - CX) < 1  # apex above the centre
    assert abs(tri.sum() / (SIDE ** 2 / 2) - 1) < 0.02
    _, dy = _centres(tri)
    assert abs(dy.mean() - H / 3) < 1  # centroid a third of the way down from the box centre


def test_diamond_is_a_square_rotated_45_degrees():
    dia = _mask("diamond")
    assert abs(dia.sum() / (SIDE ** 2 / 2) - 1) < 0.02
    assert abs(_row_width(dia, 0) - SIDE) <= 2 and abs(_row_width(dia, H / 2) - SIDE / 2) <= 2
    assert not dia[int(CY + 0.6 * H), int(CX + 0.6 * H)]  # bounding-box corners empty
    dx, dy = _centres(dia)
    assert (np.abs(dx) + np.abs(dy) <= H).all()


def test_cross_arms_are_a_third_of_the_size_wide():
    cross = _mask("cross")
    assert abs(_row_width(cross, 0) - SIDE) <= 2  # horizontal arm: full width
    assert abs(_row_width(cross, 0.7 * H) - SIDE / 3) <= 2  # below the centre: the vertical arm only
    assert abs(cross[:, int(CX)].sum() - SIDE) <= 2
    assert abs(cross[int(CY + 0.7 * H)].sum() - SIDE / 3) <= 2
    assert abs(cross.sum() / (SIDE ** 2 * 5 / 9) - 1) < 0.03
    assert not cross[int(CY + 0.5 * H), int(CX + 0.5 * H)]  # no quadrant filled


def test_ring_has_a_hole_of_0_55_of_its_radius():
    ring = _mask("ring")
    dx, dy = _centres(ring)
    r = np.sqrt(dx ** 2 + dy ** 2)
    assert r.max() <= H and r.min() > 0.55 * H
    assert r.min() < 0.55 * H + 1.5  # the hole is no bigger
    assert not ring[int(CY), int(CX)]
    assert abs(ring.sum() / (np.pi * H ** 2 * (1 - 0.55 ** 2)) - 1) < 0.02


def test_draw_shape_paints_the_mask_in_place():
    frame = np.zeros((64, 64, 3), np.uint8)
    out = synth.draw_shape(frame, "ring", "cyan", (30.0, 33.0), 30.0)
    assert out is frame
    assert ((frame == SPEC_COLORS["cyan"]).all(axis=-1) == synth.shape_mask("ring", (30.0, 33.0), 30.0, 64)).all()
    with pytest.raises(ValueError, match="hexagon"):
        synth.shape_mask("hexagon", (5.0, 5.0), 4.0, 16)


def _check_geometry(rec, size):
    m, n = rec.meta, rec.frames.shape[0]
    side, centre = m["frame_size"], m["frame_center"]
    assert ((side >= 0.3 * size) & (side <= 0.6 * size)).all()
    assert (centre - side[:, None] / 2 >= 0).all() and (centre + side[:, None] / 2 <= size).all()
    for start, length, _, _ in _events(rec):
        ev = slice(start, start + length)
        assert (side[ev] == side[start]).all()  # one size per event
        steps = np.linalg.norm(np.diff(centre[ev], axis=0), axis=1)
        assert (steps <= 0.05 * size).all()
    assert n == len(side)


def test_generated_geometry_size_range_inside_frame_and_motion(full_size, structure):
    for rec in full_size:
        _check_geometry(rec, 128)
    small = [r for recs in structure.values() for r in recs]
    for rec in small:
        _check_geometry(rec, 16)
    sides = np.concatenate([r.meta["frame_size"] for r in small]) / 16
    assert sides.min() < 0.31 and sides.max() > 0.59  # the whole range is used
    steps = np.concatenate([np.linalg.norm(np.diff(r.meta["frame_center"], axis=0), axis=1) for r in small])
    assert (steps > 0).any()  # shapes move


# ----------------------------------------------------------------------------- events and timing


def test_events_fill_the_video_and_consecutive_events_differ_in_shape(structure):
    lengths_seen = set()
    for num_frames, recs in structure.items():
        for rec in recs:
            events, m = _events(rec), rec.meta
            assert rec.frames.shape == (num_frames, 16, 16, 3) and rec.frames.dtype == np.uint8
            assert [e[0] for e in events] == list(np.cumsum([0] + [e[1] for e in events])[:-1])
            assert sum(e[1] for e in events) == num_frames
            assert all(1 <= e[1] <= 4 for e in events)
            assert all(a[2] != b[2] for a, b in zip(events, events[1:]))
            assert [synth.SHAPES[s] for s in m["frame_shape"]] == [e[2] for e in events for _ in range(e[1])]
            assert [synth.COLORS[c] for c in m["frame_color"]] == [e[3] for e in events for _ in range(e[1])]
            lengths_seen |= {e[1] for e in events}
            np.testing.assert_array_equal(rec.timestamps, np.arange(num_frames) / 2)
            assert rec.timestamps.dtype == np.float64
    assert lengths_seen == {1, 2, 3, 4}


# ----------------------------------------------------------------------------- tasks


def _check_color(rec, events):
    (shape,) = re.fullmatch(r"What color is the (\w+)\?", rec.question).groups()
    hits = [i for i, e in enumerate(events) if e[2] == shape]
    assert len(hits) == 1, (rec.uid, shape, events)
    assert len(rec.options) == 4 and len(set(rec.options)) == 4 and set(rec.options) <= set(SPEC_COLORS)
    assert rec.options[rec.answer] == events[hits[0]][3]
    return hits


def _check_shape(rec, events):
    (color,) = re.fullmatch(r"Which shape is (\w+)\?", rec.question).groups()
    hits = [i for i, e in enumerate(events) if e[3] == color]
    assert len(hits) == 1, (rec.uid, color, events)
    assert len(rec.options) == 4 and len(set(rec.options)) == 4 and set(rec.options) <= SPEC_SHAPES
    assert rec.options[rec.answer] == events[hits[0]][2]
    return hits


def _check_order(rec, events):
    assert rec.question == "Which appears first?"
    assert len(rec.options) == 2
    pairs = [re.fullmatch(r"the (\w+) (\w+)", o).groups() for o in rec.options]  # (colour, shape)
    where = []
    for color, shape in pairs:
        assert color in SPEC_COLORS and shape in SPEC_SHAPES
        at = [i for i, e in enumerate(events) if (e[3], e[2]) == (color, shape)]
        assert len(at) == 1
        # the pair's shape and colour appear nowhere else
        assert [i for i, e in enumerate(events) if e[2] == shape or e[3] == color] == at, (rec.uid, events)
        where.append(at[0])
    assert where[0] != where[1]
    assert rec.answer == int(np.argmin(where))
    return where


def _check_count(rec, events):
    (shape,) = re.fullmatch(r"How many times does the (\w+) appear\?", rec.question).groups()
    hits = [i for i, e in enumerate(events) if e[2] == shape]
    assert 1 <= len(hits) <= 4
    assert all(b - a > 1 for a, b in zip(hits, hits[1:]))  # no two adjacent
    assert rec.options == ("1", "2", "3", "4")
    assert rec.options[rec.answer] == str(len(hits))
    return hits


CHECKS = {"color": _check_color, "shape": _check_shape, "order": _check_order, "count": _check_count}


def test_every_task_follows_its_rules_and_the_answer_matches_the_ground_truth(structure):
    answers = {task: set() for task in synth.TASKS}
    for num_frames, recs in structure.items():
        for rec in recs:
            index = rec.meta["index"]
            assert rec.task == synth.TASKS[index % 4]  # task=None cycles by index
            assert rec.uid == f"synth/{rec.meta['seed']}/{index}"
            events = _events(rec)
            answer_events = CHECKS[rec.task](rec, events)
            np.testing.assert_array_equal(rec.meta["answer_frames"], _frames_of(events, answer_events))
            answers[rec.task].add(rec.answer_letter)
    assert answers == {"color": set("ABCD"), "shape": set("ABCD"), "order": set("AB"), "count": set("ABCD")}


def test_every_frame_count_from_16_to_256_is_feasible():
    for num_frames in range(synth.MIN_FRAMES, synth.MAX_FRAMES + 1):
        rec = synth.generate(9, num_frames, num_frames=num_frames, size=16)  # index = frame count: tasks rotate
        events = _events(rec)
        assert sum(e[1] for e in events) == num_frames and all(a[2] != b[2] for a, b in zip(events, events[1:]))
        CHECKS[rec.task](rec, events)


@pytest.mark.parametrize("task", synth.TASKS)
def test_explicit_task_at_both_ends_of_the_frame_range(task):
    for num_frames in (16, 256):
        for i in range(12):
            rec = synth.generate(3, i, num_frames=num_frames, task=task, size=16)
            assert rec.task == task
            CHECKS[task](rec, _events(rec))


def test_text_is_question_lettered_options_and_instruction():
    rec = synth.generate(2, 0, task="color", size=16)
    lines = rec.text().split("\n")
    assert lines[0] == rec.question and lines[-1] == DEFAULT_INSTRUCTION
    assert DEFAULT_INSTRUCTION == "Answer with the option's letter from the given choices directly."
    assert lines[1:-1] == [f"{LETTERS[i]}. {o}" for i, o in enumerate(rec.options)]
    assert rec.answer_letter == LETTERS[rec.answer]
    order = synth.generate(2, 2, size=16)
    assert order.task == "order" and order.text().split("\n")[1][:3] == "A. " and len(order.text().split("\n")) == 4


# ----------------------------------------------------------------------------- determinism, access


def _same(a, b) -> bool:
    meta_same = a.meta.keys() == b.meta.keys() and all(
        np.array_equal(a.meta[k], b.meta[k]) and np.asarray(a.meta[k]).dtype == np.asarray(b.meta[k]).dtype
        for k in a.meta)
    return (a.frames.tobytes() == b.frames.tobytes() and a.text() == b.text() and a.answer == b.answer
            and a.uid == b.uid and a.task == b.task and np.array_equal(a.timestamps, b.timestamps) and meta_same)


def test_same_seed_and_index_give_identical_bytes_in_any_order():
    first = synth.generate(11, 5, num_frames=16, size=32)
    for i in (0, 9, 3):
        synth.generate(11, i, num_frames=16, size=32)
    assert _same(first, synth.generate(11, 5, num_frames=16, size=32))
    source = synth.SynthSource(11, 10, 16, frame_size=32)
    assert _same(first, source[5]) and _same(first, source[-5])
    other_index, other_seed = synth.generate(11, 6, num_frames=16, size=32), synth.generate(12, 5, num_frames=16,
                                                                                                size=32)
    assert first.frames.tobytes() != other_index.frames.tobytes()
    assert first.frames.tobytes() != other_seed.frames.tobytes()


def test_synth_source_is_random_access_and_picklable():
    source = synth.SynthSource(4, 6, 16, frame_size=16, task="count")
    assert len(source) == 6
    copy = pickle.loads(pickle.dumps(source))
    assert _same(copy[3], source[3]) and copy[3].task == "count"
    assert _same(source[2], synth.generate(4, 2, num_frames=16, task="count", size=16))
    with pytest.raises(IndexError):
        source[6]
    with pytest.raises(IndexError):
        source[-7]
    assert len(synth.SynthSource(4, 0)) == 0


def test_split_seeds_are_disjoint():
    seeds = [synth.split_seed(b, s) for b in range(5) for s in synth.SPLITS]
    assert len(set(seeds)) == len(seeds)
    assert [synth.split_seed(0, s) for s in synth.SPLITS] == [0, 1, 2]
    with pytest.raises(ValueError):
        synth.split_seed(0, "dev")


@pytest.mark.parametrize("kwargs, word", [
    (dict(num_frames=15), "num_frames"), (dict(num_frames=257), "num_frames"), (dict(size=8), "size"),
    (dict(task="colour"), "task"), (dict(seed=-1), "seed"), (dict(index=-1), "index"),
    (dict(distractors=1.5), "distractors"), (dict(distractors=-0.1), "distractors"),
    (dict(turns=-1), "turns"),
])
def test_bad_arguments_are_refused(kwargs, word):
    args = dict(seed=0, index=0) | kwargs
    seed, index = args.pop("seed"), args.pop("index")
    with pytest.raises(ValueError, match=word):
        synth.generate(seed, index, **args)
    if word not in ("index",):
        with pytest.raises(ValueError, match=word):
            synth.SynthSource(seed, 3, args.get("num_frames", 32), frame_size=args.get("size", 128),
                              task=args.get("task"), distractors=args.get("distractors", 1.0),
                              turns=args.get("turns", 0))


def test_source_takes_several_video_lengths_in_turn():
    source = synth.SynthSource(7, 5, (16, 24), frame_size=16)
    assert [len(source[i].frames) for i in range(5)] == [16, 24, 16, 24, 16]
    assert source.num_frames == 24 and source.frames_of(3) == 24
    assert np.array_equal(source[3].frames, synth.generate(7, 3, num_frames=24, size=16).frames)
    with pytest.raises(ValueError, match="num_frames"):
        synth.SynthSource(7, 5, (16, 8))
    with pytest.raises(ValueError, match="at least one"):
        synth.SynthSource(7, 5, ())


def test_source_takes_several_tasks_in_turn():
    source = synth.SynthSource(7, 6, 16, frame_size=16, task=("order", "color"))
    assert [source[i].task for i in range(4)] == ["order", "color", "order", "color"]
    assert source[3].question == synth.generate(7, 3, num_frames=16, size=16, task="color").question
    with pytest.raises(ValueError, match="task"):
        synth.SynthSource(7, 6, 16, task=("color", "hue"))
    with pytest.raises(ValueError, match="at least one task"):
        synth.SynthSource(7, 6, 16, task=())


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_distractors_blank_non_answer_events_only(p):
    # Everything but the hidden events' pixels is the full example's: the same events,
    # geometry and noise, the same question and answer; hidden frames are background only.
    hidden_share = []
    for i in range(24):
        full = synth.generate(3, i, num_frames=32, size=32)
        rec = synth.SynthSource(3, 24, 32, frame_size=32, distractors=p)[i]
        assert (rec.question, rec.options, rec.answer) == (full.question, full.options, full.answer)
        np.testing.assert_array_equal(rec.meta["answer_frames"], full.meta["answer_frames"])
        ev, ev_full = rec.meta["events"], full.meta["events"]
        np.testing.assert_array_equal(ev[:, :2], ev_full[:, :2])
        hidden = ev[:, 2] < 0
        answer_events = [e for e, (start, _, _, _) in enumerate(ev_full) if full.meta["answer_frames"][start]]
        assert not hidden[answer_events].any()
        np.testing.assert_array_equal(ev[~hidden], ev_full[~hidden])
        assert (ev[hidden, 3] < 0).all()
        for start, length, shape, _ in ev:
            frames, frames_full = rec.frames[start:start + length], full.frames[start:start + length]
            if shape >= 0:
                np.testing.assert_array_equal(frames, frames_full)
            else:  # background and noise only: no pixel above the noise band
                assert frames.max() <= synth.BACKGROUND + synth.NOISE
                assert not np.array_equal(frames, frames_full)
                assert (rec.meta["frame_shape"][start:start + length] == -1).all()
        hidden_share.append(hidden.sum() / max(1, len(ev) - len(answer_events)))
    if p == 0.0:
        assert min(hidden_share) == 1.0  # only the answer events remain
    else:
        assert 0.3 < np.mean(hidden_share) < 0.7
    # Shown with probability 1 is the full example, byte for byte.
    a, b = synth.generate(3, 5, num_frames=32, size=32, distractors=1.0), synth.generate(3, 5, num_frames=32, size=32)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.meta["events"], b.meta["events"])


def _truth(rec):
    """(shape, colour) word pairs of the clip's shown events, from its ground truth."""
    return [(synth.SHAPES[s], synth.COLORS[c]) for _, _, s, c in rec.meta["events"] if s >= 0]


def test_turns_are_true_of_the_clip_and_do_not_give_the_answer_away():
    # Each turn is checked against the events as drawn (meta), not against qa_turns.
    counts, seen = [], set()
    for i in range(64):
        rec = synth.generate(4, i, num_frames=32, size=16, turns=4, distractors=0.6 if i % 2 else 1.0)
        plain = synth.generate(4, i, num_frames=32, size=16, distractors=0.6 if i % 2 else 1.0)
        assert plain.preamble == ""
        assert (rec.question, rec.options, rec.answer) == (plain.question, plain.options, plain.answer)
        np.testing.assert_array_equal(rec.frames, plain.frames)
        lines = rec.preamble.splitlines()
        assert rec.preamble == "" or rec.preamble.endswith("\n")
        counts.append(len(lines))
        pairs = _truth(rec)
        key = set(rec.question.rstrip("?").split()) & set(synth.SHAPES + synth.COLORS)
        for line in lines:
            question, answer = line.rsplit(" ", 1)
            assert question != rec.question and not key & set(question.rstrip("?").split() + [answer]), line
            words = question.rstrip("?").split()
            if question.startswith("What color is the "):
                shape = words[-1]
                colours = [c for s, c in pairs if s == shape]
                assert colours == [answer], (line, pairs)
                seen.add("color")
            elif question.startswith("Which shape is "):
                colour = words[-1]
                assert [s for s, c in pairs if c == colour] == [answer], (line, pairs)
                seen.add("shape")
            else:
                assert question.startswith("How many times does the ") and question.endswith(" appear?"), line
                n = sum(s == words[-2] for s, _ in pairs)
                assert 1 <= n <= 4 and answer == str(n), (line, pairs)
                seen.add("count")
        assert len(set(lines)) == len(lines)
    assert seen == {"color", "shape", "count"}
    assert min(counts) == 0 and max(counts) == 4  # k uniform in 0..turns
    # The text after the video starts with the turns, then the question as before.
    rec = next(r for r in (synth.generate(4, i, num_frames=32, size=16, turns=4) for i in range(20)) if r.preamble)
    assert rec.text().startswith(rec.preamble + rec.question + "\n")


def test_turns_reach_the_source_and_its_repr():
    src = synth.SynthSource(4, 8, 16, frame_size=16, turns=3)
    assert "turns=3" in repr(src)
    assert [src[i].preamble for i in range(8)] == [synth.generate(4, i, num_frames=16, size=16, turns=3).preamble
                                                   for i in range(8)]
    assert any(src[i].preamble for i in range(8))
