"""Tests for hybridvlm.video: sampling, PyAV decoding with seeks, errors, model-input packing.

Clips are generated procedurally (write_test_clip) into tmp dirs; every frame carries its
index in binary (synthetic_frame_index reads it back), so each test can check that the
decoder landed on exactly the frame its timestamp claims.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction

import av
import numpy as np
import pytest

from hybridvlm import video as V
from hybridvlm.video import (
    VideoClip,
    VideoError,
    frames_to_pixels,
    pack_tubelets,
    read_image,
    read_video,
    sample_timestamps,
    synthetic_frame,
    synthetic_frame_index,
    write_image,
    write_test_clip,
)

CONTAINERS = [".mp4", ".webm", ".mkv", ".avi"]
FPS, NUM_FRAMES, HEIGHT, WIDTH = 24, 48, 128, 160  # write_test_clip defaults: a 2 s clip


def _clip_or_skip(directory, ext: str, **kwargs) -> str:
    """Writes the default test clip with extension ext; skips only when the wheel lacks
    every encoder for that container."""
    if V.pick_encoder(ext) is None:
        pytest.skip(f"PyAV {av.__version__} has no encoder for {ext} (tried {V.TEST_CLIP_ENCODERS[ext]})")
    path = os.path.join(directory, "clip" + ext)
    write_test_clip(path, **kwargs)
    return path


def _indices(clip: VideoClip) -> list[int]:
    return [synthetic_frame_index(frame) for frame in clip.frames]


def _nearest_frames(targets: np.ndarray, fps: float) -> list[int]:
    """The frame read_video should keep per target: nearest, ties to the earlier."""
    return [int(np.ceil(t * fps - 0.5 - 1e-9)) for t in targets]


def _open_fds() -> int | None:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


# ------------------------------------------------------------------------------------------
# sample_timestamps
# ------------------------------------------------------------------------------------------


def test_uniform_sampling_is_segment_centres():
    ts = sample_timestamps(10.0, max_frames=5, stream_fps=None)
    np.testing.assert_allclose(ts, [1.0, 3.0, 5.0, 7.0, 9.0])
    ts = sample_timestamps(7.3, max_frames=16, stream_fps=30.0)
    assert ts.shape == (16,)
    np.testing.assert_allclose(np.diff(ts), 7.3 / 16)
    assert ts[0] > 0 and ts[-1] < 7.3
    np.testing.assert_allclose(ts[0], 7.3 / 32)


def test_uniform_sampling_capped_at_source_frames():
    # 2 s at 24 fps has 48 frames: asking for 100 gives one target per frame, centred.
    ts = sample_timestamps(2.0, max_frames=100, stream_fps=24.0)
    assert ts.shape == (48,)
    np.testing.assert_allclose(ts, (np.arange(48) + 0.5) / 24)


def test_fps_sampling_spacing_and_cap():
    ts = sample_timestamps(10.0, max_frames=100, fps=2.0, stream_fps=30.0)
    np.testing.assert_allclose(ts, np.arange(20) / 2.0)
    # 20 candidates, cap 4: the centre of each group of 5 (indices 2, 7, 12, 17).
    ts = sample_timestamps(10.0, max_frames=4, fps=2.0, stream_fps=30.0)
    np.testing.assert_allclose(ts, [1.0, 3.5, 6.0, 8.5])
    # asking for more than the stream rate gives the stream's frames, not duplicates.
    ts = sample_timestamps(1.0, max_frames=100, fps=100.0, stream_fps=10.0)
    np.testing.assert_allclose(ts, np.arange(10) / 10.0)
    # a non-integer count: t < duration only.
    np.testing.assert_allclose(sample_timestamps(1.0, max_frames=9, fps=3.0, stream_fps=None), [0, 1 / 3, 2 / 3])


def test_sampling_edge_cases():
    np.testing.assert_array_equal(sample_timestamps(0.0, max_frames=8, stream_fps=24.0), [0.0])
    np.testing.assert_array_equal(sample_timestamps(0.0, max_frames=8, fps=2.0, stream_fps=None), [0.0])
    np.testing.assert_allclose(sample_timestamps(4.0, max_frames=1, stream_fps=24.0), [2.0])
    np.testing.assert_allclose(sample_timestamps(4.0, max_frames=1, fps=1.0, stream_fps=24.0), [2.0])
    np.testing.assert_allclose(sample_timestamps(0.1, max_frames=8, fps=1.0, stream_fps=None), [0.0])
    for bad in (dict(max_frames=0), dict(max_frames=4, fps=0.0), dict(max_frames=4, fps=-1.0)):
        with pytest.raises(ValueError):
            sample_timestamps(1.0, stream_fps=None, **bad)
    with pytest.raises(ValueError):
        sample_timestamps(-1.0, max_frames=4, stream_fps=None)


# ------------------------------------------------------------------------------------------
# read_video round trips
# ------------------------------------------------------------------------------------------


def test_synthetic_frame_index_reads_back_every_index():
    for i in (0, 1, 5, 47, 200, 1023):
        frame = synthetic_frame(i, 1024, HEIGHT, WIDTH)
        assert synthetic_frame_index(frame) == i
    assert synthetic_frame_index(synthetic_frame(37, 48, 720, 1280)) == 37


@pytest.mark.parametrize("ext", CONTAINERS)
def test_round_trip_uniform(tmp_path, ext):
    path = _clip_or_skip(tmp_path, ext)
    stats = {}
    clip = read_video(path, max_frames=8, size=(64, 80), stats=stats)
    assert clip.frames.shape == (8, 64, 80, 3) and clip.frames.dtype == np.uint8
    assert clip.timestamps.shape == (8,) and clip.source == path
    assert np.all(np.diff(clip.timestamps) > 0)
    assert clip.timestamps[0] >= 0 and clip.timestamps[-1] < NUM_FRAMES / FPS
    assert clip.fps == pytest.approx(FPS) and clip.duration == pytest.approx(NUM_FRAMES / FPS, abs=0.05)
    # Frames are the ones drawn at the reported times, and the nearest to the targets.
    targets = sample_timestamps(clip.duration, max_frames=8, stream_fps=clip.fps)
    assert _indices(clip) == _nearest_frames(targets, FPS) == [3, 9, 15, 21, 27, 33, 39, 45]
    np.testing.assert_allclose(clip.timestamps, np.array(_indices(clip)) / FPS, atol=1e-3)
    # Dense targets (0.25 s apart, 1 s keyframe interval) decode straight through.
    assert stats["seeks"] == 0 and stats["decoded"] == 46 and stats["kept"] == 8


@pytest.mark.parametrize("ext", CONTAINERS)
def test_round_trip_with_seeks(tmp_path, ext):
    # Keyframes every 5 frames (~0.21 s), targets 1/3 s apart and off the keyframes: after
    # the first GOP shows the spacing, every further target is reached by a seek back to a
    # keyframe and decoding forward, in every container.
    path = _clip_or_skip(tmp_path, ext, keyframe_interval=5)
    stats = {}
    clip = read_video(path, max_frames=6, size=(64, 80), stats=stats)
    targets = sample_timestamps(NUM_FRAMES / FPS, max_frames=6, stream_fps=FPS)
    assert _indices(clip) == _nearest_frames(targets, FPS) == [4, 12, 20, 28, 36, 44]
    np.testing.assert_allclose(clip.timestamps, np.array(_indices(clip)) / FPS, atol=1e-3)
    assert stats["seeks"] >= 4 and stats["decoded"] <= 6 * (5 + 1)


def test_seek_landing_after_target_is_retried(tmp_path, monkeypatch):
    # A broken index can land a seek after its target; read_video must seek further back
    # rather than keep a later frame.
    path = _clip_or_skip(tmp_path, ".mkv", keyframe_interval=5)
    original = V._Decoder._seek

    def first_seek_lands_late(self, target):
        original(self, target + 0.4 if self.stats["seeks"] == 0 else target)

    monkeypatch.setattr(V._Decoder, "_seek", first_seek_lands_late)
    stats = {}
    clip = read_video(path, max_frames=6, size=(32, 40), stats=stats)
    assert _indices(clip) == [4, 12, 20, 28, 36, 44]
    assert stats["seeks"] == 5  # 4 targets seek, one of them twice


@pytest.mark.parametrize("ext", CONTAINERS)
def test_round_trip_full_resolution_pixels(tmp_path, ext):
    path = _clip_or_skip(tmp_path, ext)
    clip = read_video(path, max_frames=100)
    # One frame per source frame, each the right one, RGB (not BGR) and close to what was drawn.
    assert clip.frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert _indices(clip) == list(range(NUM_FRAMES))
    for i in (0, 17, 47):
        drawn = synthetic_frame(i, NUM_FRAMES, HEIGHT, WIDTH).astype(np.float32)
        assert np.abs(clip.frames[i].astype(np.float32) - drawn).mean() < 8.0
    red_row = clip.frames[0, 5, :, 0].astype(np.float32)
    assert red_row[-10:].mean() > red_row[:10].mean() + 80  # red grows left to right


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_fps_sampling_timestamps(tmp_path, ext):
    path = _clip_or_skip(tmp_path, ext)
    clip = read_video(path, max_frames=100, fps=5.0, size=(32, 40))
    expected = np.arange(10) / 5.0  # 0, 0.2, ..., 1.8 s
    assert len(clip) == 10
    assert np.all(np.abs(clip.timestamps - expected) <= 0.5 / FPS + 1e-3)  # within half a frame
    assert _indices(clip) == _nearest_frames(expected, FPS) == [0, 5, 10, 14, 19, 24, 29, 34, 38, 43]
    # capped: 10 candidates, 3 kept, uniformly.
    clip = read_video(path, max_frames=3, fps=5.0, size=(32, 40))
    np.testing.assert_allclose(clip.timestamps, [0.2, 1.0, 1.6], atol=0.5 / FPS + 1e-3)


def test_raw_stream_without_duration_uses_decode_pass(tmp_path):
    # A raw H.264 stream has no duration and no pts: the duration comes from a decode pass
    # and frame times from counting at the stream rate (25 fps, the raw demuxer's default).
    if V.pick_encoder(".mp4") != "libx264":
        pytest.skip("libx264 encoder absent from this PyAV build")
    path = str(tmp_path / "clip.h264")
    write_test_clip(path, fps=25, codec="libx264")
    stats = {}
    clip = read_video(path, max_frames=6, size=(32, 40), stats=stats)
    assert stats["duration_source"] == "decode" and stats["duration"] == pytest.approx(NUM_FRAMES / 25)
    assert _indices(clip) == list(np.round(clip.timestamps * 25).astype(int))
    assert _indices(clip) == _nearest_frames(sample_timestamps(NUM_FRAMES / 25, max_frames=6, stream_fps=25), 25)


# ------------------------------------------------------------------------------------------
# Streaming: seeks on a long 720p clip, bounded memory
# ------------------------------------------------------------------------------------------

LONG = dict(num_frames=200, fps=10, height=720, width=1280, keyframe_interval=5)  # 20 s, 0.5 s GOP


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("long") / "long.mp4")
    if V.pick_encoder(path) is None:
        pytest.skip(f"PyAV {av.__version__} has no mp4 encoder")
    write_test_clip(path, **LONG)  # ~1-3 s on 2 cores
    return path


def test_long_clip_seeks_and_decodes_few_frames(long_clip):
    stats = {}
    clip = read_video(long_clip, max_frames=16, size=(224, 224), stats=stats)
    assert clip.frames.shape == (16, 224, 224, 3)
    targets = sample_timestamps(20.0, max_frames=16, stream_fps=10.0)
    assert _indices(clip) == _nearest_frames(targets, 10.0)
    np.testing.assert_allclose(clip.timestamps, np.array(_indices(clip)) / 10.0, atol=1e-3)
    # Targets are 1.25 s apart > the 0.5 s keyframe spacing: each one is a seek, and each
    # seek decodes at most one GOP plus the target frame.
    gop = LONG["keyframe_interval"]
    assert stats["seeks"] >= 12
    assert stats["decoded"] <= 16 * (gop + 1) < LONG["num_frames"] / 2


def test_long_clip_peak_memory_is_small(long_clip):
    """Peak RSS growth of a fresh process reading 16 frames, vs. the 527 MiB the 200 RGB
    frames would take at 720p. The kernel's peak RSS (VmHWM) counts FFmpeg's own buffers,
    where decoded frames live invisible to tracemalloc, so holding decoded frames would
    show up; a subprocess makes the peak this read's alone. (getrusage's ru_maxrss would
    not do: Linux carries it over from the parent across fork + exec.)"""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc/self/status for the peak RSS (VmHWM)")
    script = textwrap.dedent(
        """
        import importlib.util, json, sys

        def peak_kib():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

        # load video.py alone: importing the hybridvlm package would pull in JAX.
        spec = importlib.util.spec_from_file_location("video_under_test", sys.argv[1])
        video = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = video
        spec.loader.exec_module(video)
        before = peak_kib()
        stats = {}
        clip = video.read_video(sys.argv[2], max_frames=16, size=(224, 224), stats=stats)
        print(json.dumps(dict(before_kib=before, after_kib=peak_kib(), frames=len(clip), **stats)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, V.__file__, long_clip], capture_output=True, text=True, timeout=60, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    growth_mib = (result["after_kib"] - result["before_kib"]) / 1024
    all_frames_mib = LONG["num_frames"] * LONG["height"] * LONG["width"] * 3 / 2**20
    print(f"peak RSS growth {growth_mib:.1f} MiB vs {all_frames_mib:.0f} MiB for all frames; {result}")
    assert result["frames"] == 16 and result["before_kib"] > 0
    assert growth_mib < all_frames_mib / 8, (growth_mib, result)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def _write_wav(path) -> None:
    """An audio-only file: a container with no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = (np.sin(np.arange(8000) / 5.0) * 1e4).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 8000, 0, Fraction(1, 8000)
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _truncate(src: str, dst, fraction: float) -> None:
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])


def _bad_file(kind: str, directory) -> tuple[str, str]:
    """(path, reason fragment the message must contain) for each kind of bad input."""
    d = str(directory)
    if kind == "missing":
        return os.path.join(d, "nope.mp4"), "no such file"
    if kind == "empty":
        path = os.path.join(d, "empty.mp4")
        open(path, "wb").close()
        return path, "empty"
    if kind == "random_bytes":
        path = os.path.join(d, "noise.mp4")
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).bytes(50_000))
        return path, "corrupt"
    if kind == "truncated_mp4":  # moov atom at the end is cut off
        path = os.path.join(d, "cut.mp4")
        _truncate(_clip_or_skip(d, ".mp4"), path, 0.5)
        return path, "corrupt"
    if kind == "truncated_mkv":  # header intact, last part of the frames gone
        path = os.path.join(d, "cut.mkv")
        _truncate(_clip_or_skip(d, ".mkv"), path, 0.6)
        return path, "truncated"
    if kind == "header_only_mkv":  # opens, but not one frame decodes
        path = os.path.join(d, "stub.mkv")
        _truncate(_clip_or_skip(d, ".mkv"), path, 0.1)
        return path, "no frames decodable"
    if kind == "text":
        path = os.path.join(d, "notes.txt")
        with open(path, "w") as f:
            f.write("this is not a video\n" * 50)
        return path, "not a video"
    if kind == "audio_only":
        path = os.path.join(d, "tone.wav")
        _write_wav(path)
        return path, "no video stream"
    if kind == "directory":
        return d, "directory"
    raise AssertionError(kind)


BAD_KINDS = [
    "missing",
    "empty",
    "random_bytes",
    "truncated_mp4",
    "truncated_mkv",
    "header_only_mkv",
    "text",
    "audio_only",
    "directory",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_raise_video_error_naming_file(tmp_path, kind):
    path, reason = _bad_file(kind, tmp_path)
    fds = _open_fds()
    with pytest.raises(VideoError) as info:
        read_video(path, max_frames=8)
    message = str(info.value)
    assert path in message and reason in message, message
    assert info.value.path == path and isinstance(info.value, ValueError)
    assert _open_fds() == fds  # no file handle left open on the error path


@pytest.mark.parametrize("kind", ["missing", "empty", "random_bytes", "text", "audio_only"])
def test_bad_files_raise_for_images_too(tmp_path, kind):
    path, reason = _bad_file(kind, tmp_path)
    with pytest.raises(VideoError, match=reason) as info:
        read_image(path)
    assert path in str(info.value)


def test_no_handles_left_open(tmp_path):
    path = _clip_or_skip(tmp_path, ".mp4")
    fds = _open_fds()
    for _ in range(3):
        read_video(path, max_frames=4, size=(32, 40))
        read_image(path)
    assert _open_fds() == fds


def test_bad_arguments(tmp_path):
    path = _clip_or_skip(tmp_path, ".mp4")
    with pytest.raises(ValueError):
        read_video(path, max_frames=0)
    with pytest.raises(ValueError):
        read_video(path, max_frames=4, size=(0, 10))
    with pytest.raises(ValueError, match="extension"):
        write_test_clip(tmp_path / "clip.xyz")


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------


def test_read_image_png_exact_and_resized(tmp_path):
    drawn = synthetic_frame(37, NUM_FRAMES, HEIGHT, WIDTH)
    path = str(tmp_path / "frame.png")
    write_image(path, drawn)
    clip = read_image(path)
    assert clip.frames.shape == (1, HEIGHT, WIDTH, 3) and clip.frames.dtype == np.uint8
    np.testing.assert_array_equal(clip.frames[0], drawn)  # png is lossless
    np.testing.assert_array_equal(clip.timestamps, [0.0])
    assert clip.fps is None and clip.duration is None and clip.source == path
    small = read_image(path, size=(48, 60))
    assert small.frames.shape == (1, 48, 60, 3)
    assert synthetic_frame_index(small.frames[0]) == 37


def test_read_image_jpg(tmp_path):
    drawn = synthetic_frame(21, NUM_FRAMES, HEIGHT, WIDTH)
    path = str(tmp_path / "frame.jpg")
    write_image(path, drawn)
    clip = read_image(path, size=(64, 80))
    assert clip.frames.shape == (1, 64, 80, 3)
    assert synthetic_frame_index(clip.frames[0]) == 21
    full = read_image(path).frames[0].astype(np.float32)
    assert np.abs(full - drawn).mean() < 6.0


# ------------------------------------------------------------------------------------------
# Model inputs
# ------------------------------------------------------------------------------------------


def test_frames_to_pixels_values_and_layout():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 4, 5, 3), dtype=np.uint8)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    pixels = frames_to_pixels(frames, mean=mean, std=std)
    assert pixels.shape == (3, 3, 4, 5) and pixels.dtype == np.float32
    expected = np.empty((3, 3, 4, 5), np.float64)
    for t in range(3):
        for c in range(3):
            for y in range(4):
                for x in range(5):
                    expected[t, c, y, x] = (frames[t, y, x, c] / 255.0 - mean[c]) / std[c]
    np.testing.assert_allclose(pixels, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(frames_to_pixels(np.full((1, 1, 1, 3), 255, np.uint8), mean=0, std=1), 1.0)
    with pytest.raises(ValueError):
        frames_to_pixels(frames.astype(np.float32), mean=mean, std=std)


@pytest.mark.parametrize("num_frames, patch", [(5, 2), (4, 2), (7, 3), (3, 1)])
def test_pack_tubelets_layout_and_padding(num_frames, patch):
    pixels = np.random.default_rng(1).standard_normal((num_frames, 3, 2, 4)).astype(np.float32)
    packed = pack_tubelets(pixels, patch)
    n_tubelets = -(-num_frames // patch)
    assert packed.shape == (n_tubelets, patch * 3, 2, 4)
    # Frame-major: channel k * 3 + c of tubelet j is channel c of frame j * patch + k,
    # frames past the end repeating the last one (HF NemotronH Omni's packing).
    for j in range(n_tubelets):
        for k in range(patch):
            source = min(j * patch + k, num_frames - 1)
            for c in range(3):
                np.testing.assert_array_equal(packed[j, k * 3 + c], pixels[source, c])


def test_pack_tubelets_odd_count_pads_with_last_frame():
    pixels = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((5, 3, 1, 1), np.float32)
    packed = pack_tubelets(pixels, 2)
    # tubelets hold frames (0, 1), (2, 3), (4, 4)
    np.testing.assert_array_equal(packed[:, :, 0, 0], [[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3], [4, 4, 4, 4, 4, 4]])


def test_video_pipeline_end_to_end(tmp_path):
    """The demo's path: generated clip -> frames -> normalised pixels -> tubelets."""
    path = _clip_or_skip(tmp_path, ".mp4")
    clip = read_video(path, max_frames=5, size=(32, 32))
    tubelets = pack_tubelets(frames_to_pixels(clip.frames, mean=(0.5,) * 3, std=(0.5,) * 3), 2)
    assert tubelets.shape == (3, 6, 32, 32) and tubelets.dtype == np.float32
    assert -1.0 <= tubelets.min() and tubelets.max() <= 1.0
    np.testing.assert_array_equal(tubelets[2, :3], tubelets[2, 3:])  # padded with the last frame
