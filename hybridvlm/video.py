"""Video and image input: decode local files with PyAV, sample frames, resize, normalise, pack tubelets.

Public API:
  VideoClip                      frames (T, H, W, 3) uint8 RGB + timestamps (T,) seconds
  VideoError(ValueError)         "<path>: <reason>" for missing/empty/corrupt/unsupported files
  sample_timestamps(duration, max_frames=, fps=, stream_fps=) -> (T,) float64 target times
  read_video(path, max_frames=, fps=, size=, stats=) -> VideoClip   (seeks and streams)
  read_image(path, size=) -> VideoClip                               (T = 1)
  frames_to_pixels(frames, mean=, std=) -> (T, 3, H, W) float32 normalised
  pack_tubelets(pixels, temporal_patch) -> (ceil(T / p), p * 3, H, W)
  write_test_clip(path, ...) / write_image(path, rgb) / synthetic_frame(_index)

Memory: read_video holds one decoded frame at a time (plus the decoder's own reference
frames) and the kept, resized RGB frames, so sampling 128 frames from a long 720p file
costs ~128 small arrays, not the video.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

__all__ = [
    "VideoClip",
    "VideoError",
    "frames_to_pixels",
    "pack_tubelets",
    "pick_encoder",
    "read_image",
    "read_video",
    "sample_timestamps",
    "synthetic_frame",
    "synthetic_frame_index",
    "write_image",
    "write_test_clip",
]

# swscale filter for resizing; bicubic is the closest to the HF processor's antialiased
# bicubic (swscale widens the filter when downscaling, so it does not alias).
_INTERPOLATION = "BICUBIC"
# Until decoding has shown two keyframes we assume keyframes this far apart (seconds).
_INITIAL_GOP_S = 1.0
# Never seek for a gap of fewer frames than this: a seek (index lookup, decoder flush,
# keyframe decode) costs about as much as decoding a few frames.
_MIN_SEEK_GAP_FRAMES = 4
# A container duration covers all streams; audio may outlast the video by this much.
_CONTAINER_SLACK_S = 1.0
# Seeks that land after the target (a broken index) are retried this many times, each
# further back, the last from the very start.
_SEEK_RETRIES = 4


class VideoError(ValueError):
    """A video/image file cannot be read; the message is "<path>: <reason>"."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class VideoClip:
    """Sampled frames of one video (or one image, T = 1).

    frames: (T, H, W, 3) uint8 RGB.
    timestamps: (T,) float64 presentation times in seconds from the stream start, increasing;
      kept for the prompt ("Frame 1 sampled at 0.50 seconds ...").
    source: the file path.
    fps: the stream's average frame rate, None for images or when unknown.
    duration: the stream duration in seconds, None for images.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    source: str
    fps: float | None
    duration: float | None

    def __len__(self) -> int:
        return int(self.frames.shape[0])


# --------------------------------------------------------------------------------------
# Sampling (pure)
# --------------------------------------------------------------------------------------


def sample_timestamps(
    duration: float,
    *,
    max_frames: int,
    fps: float | None = None,
    stream_fps: float | None = None,
) -> np.ndarray:
    """Target times in seconds, (T,) float64, increasing, in [0, duration), T <= max_frames.

    fps None (uniform): the centres of `max_frames` equal segments of [0, duration), so the
      first and last segments are sampled as evenly as the middle ones.
    fps given: every 1/fps seconds starting at 0 (the start of each interval, like ffmpeg's
      fps filter and HF's sample-by-fps), i.e. t_k = k / fps for t_k < duration; when that
      is more than `max_frames`, the centres of `max_frames` equal groups of them.
    stream_fps (the video's frame rate, if known) caps both modes at one target per source
      frame, so a short clip is not sampled into duplicate frames.
    duration 0 (a single frame or unknown length) gives [0.0].
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if not duration >= 0:  # also rejects NaN
        raise ValueError(f"duration must be >= 0, got {duration}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if duration == 0:
        return np.zeros(1)
    n_source = None
    if stream_fps is not None and stream_fps > 0:
        # the 1e-6 absorbs float noise in duration * fps (e.g. 47.9999999 frames).
        n_source = max(1, math.floor(duration * stream_fps + 1e-6))
    if fps is None:
        n = max_frames if n_source is None else min(max_frames, n_source)
        return (np.arange(n) + 0.5) * (duration / n)
    if stream_fps is not None and stream_fps > 0:
        fps = min(fps, stream_fps)
    count = max(1, math.ceil(duration * fps - 1e-6))
    times = np.arange(count) / fps
    if count > max_frames:
        # uniform subsample: the centre element of each of max_frames equal groups.
        idx = ((np.arange(max_frames) + 0.5) * count / max_frames).astype(np.int64)
        times = times[idx]
    return times


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def _check_file(path: str) -> None:
    """Raises VideoError for the failures FFmpeg would report vaguely."""
    if not os.path.exists(path):
        raise VideoError(path, "no such file")
    if os.path.isdir(path):
        raise VideoError(path, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "empty file (0 bytes)")


def _open(path: str):
    """av.open with FFmpeg's failures turned into VideoError naming the file."""
    _check_file(path)
    try:
        return av.open(path, mode="r")
    except av.FFmpegError as e:
        raise VideoError(path, f"cannot open: corrupt or unsupported format ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    # PyAV's messages repeat the file name; keep only FFmpeg's reason.
    return getattr(e, "strerror", None) or str(e)


# Demuxers that accept arbitrary bytes (a text file opens as "tty" = ANSI art), so a file
# they claim is not a video for our purposes.
_NON_VIDEO_FORMATS = {"tty"}
_NON_VIDEO_CODECS = {"ansi"}


def _video_stream(container, path: str):
    """The first video stream, or VideoError saying what the file holds instead."""
    fmt = set(container.format.name.split(","))
    streams = list(container.streams.video)
    if fmt & _NON_VIDEO_FORMATS or (streams and streams[0].codec_context.name in _NON_VIDEO_CODECS):
        raise VideoError(path, f"unsupported file: not a video or image (detected as {container.format.name!r})")
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoError(
            path, f"unsupported file: no video stream (format {container.format.name!r}, streams: {', '.join(kinds)})"
        )
    return streams[0]


def _stream_fps(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _start_time(stream) -> float:
    """Stream start in seconds; frame times are reported relative to it (first frame ~0)."""
    if stream.start_time is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def _tag_seconds(value: str | None) -> float | None:
    """Seconds from a Matroska per-track DURATION tag "HH:MM:SS.nnnnnnnnn" (None if absent)."""
    try:
        hours, minutes, seconds = value.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except (AttributeError, ValueError):
        return None


def _header_duration(container, stream) -> tuple[float | None, str | None]:
    """(seconds, source) from the headers: the video stream's own duration (mp4/avi field,
    else the Matroska DURATION tag), else the container's (which may include longer audio)."""
    if stream.duration is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base), "stream"
    tag = _tag_seconds(stream.metadata.get("DURATION") or stream.metadata.get("duration"))
    if tag is not None and tag > 0:
        return tag, "stream"
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base, "container"
    return None, None


def _decoded_duration(path: str) -> tuple[float, bool]:
    """(seconds, frames_have_pts) from a decode pass over its own handle of the file, for
    raw streams whose headers know no duration. Frames are dropped as they come (O(1) memory);
    frames without pts (raw H.264) are counted at the stream rate instead."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        fps = _stream_fps(stream)
        start, count, last, period = _start_time(stream), 0, None, 0.0
        try:
            for frame in container.decode(stream):
                count += 1
                if frame.time is not None:
                    last = frame.time - start
                if frame.duration and frame.time_base:
                    period = float(frame.duration * frame.time_base)
        except av.FFmpegError as e:
            raise VideoError(path, f"corrupt video data ({_reason(e)})") from None
    if count == 0:
        raise VideoError(path, "no frames decodable")
    period = period or (1.0 / fps if fps else 0.0)
    if last is None:
        return count * period, False
    return last + period, True


class _Decoder:
    """Decodes forward from the current position; seeks when that is cheaper.

    Seek rule: a seek lands on the keyframe before the target and decodes from there, so it
    only saves work when a keyframe surely lies between the current position and the
    target, i.e. when target - position > the keyframe spacing (and > _MIN_SEEK_GAP_FRAMES).
    The spacing is estimated online as the largest of (a) gaps between consecutive
    keyframes decoded and (b) target - landing keyframe after a seek (the landing keyframe
    is the last one before the target, so the next one is at least that far); until known,
    it is _INITIAL_GOP_S. Dense targets decode straight through; sparse ones seek. Streams whose frames carry no pts (raw H.264) never seek: their frame times
    are counted from the start at the stream rate.
    """

    def __init__(self, container, stream, stats: dict, *, seekable: bool = True):
        self.container, self.stream, self.stats = container, stream, stats
        self.seekable = seekable
        self.start = _start_time(stream)
        fps = _stream_fps(stream)
        self.period = 1.0 / fps if fps else 0.0
        self.gop: float | None = None  # keyframe spacing estimate (seconds), None = unknown
        self.position = 0.0  # time of the last decoded frame (decoding starts at the start)
        self.count = 0  # frames decoded since the start; times of pts-less frames
        self.last_key: float | None = None
        self.last = None  # the last decoded frame, for targets past the end (see read_video)
        self.frames = None  # generator of decoded frames; replaced on every seek

    def _generator(self):
        for packet in self.container.demux(self.stream):
            yield from packet.decode()

    def _next(self):
        """The next decoded frame and its time, or (None, None) at the end of the stream."""
        if self.frames is None:
            self.frames = self._generator()
        frame = next(self.frames, None)
        if frame is None:
            return None, None
        self.stats["decoded"] += 1
        self.count += 1
        t = (self.count - 1) * self.period if frame.time is None else frame.time - self.start
        if frame.key_frame:
            if self.last_key is not None and t > self.last_key:
                self.gop = max(self.gop or 0.0, t - self.last_key)
            self.last_key = t
        self.position, self.last = t, frame
        return frame, t

    def _seek(self, target: float) -> None:
        offset = int((target + self.start) / self.stream.time_base)
        self.container.seek(offset, backward=True, any_frame=False, stream=self.stream)
        self.stats["seeks"] += 1
        if self.frames is not None:
            self.frames.close()
        self.frames, self.last_key, self.last = None, None, None

    def _seek_gap(self) -> float:
        """Seek when the target is further ahead of the current position than this."""
        gop = _INITIAL_GOP_S if self.gop is None else self.gop
        return max(gop, _MIN_SEEK_GAP_FRAMES * self.period)

    def frame_at(self, target: float, tolerance: float):
        """(frame, time) of the first frame with time >= target - tolerance; (None, None)
        at the end of the stream. Frames before it are dropped unconverted, so only one
        decoded frame is alive at a time."""
        if self.seekable and target - self.position > self._seek_gap():
            return self._seek_to(target, tolerance)
        while True:
            frame, t = self._next()
            if frame is None or t >= target - tolerance:
                return frame, t

    def _seek_to(self, target: float, tolerance: float):
        back = 0.0
        for attempt in range(_SEEK_RETRIES + 1):
            at_start = attempt == _SEEK_RETRIES or target - back <= 0
            self._seek(0.0 if at_start else target - back)
            frame, t = self._next()
            if frame is None:
                return None, None
            # Landing on the last keyframe before the target bounds the spacing from below
            # (not so after a retry, which seeks further back on purpose); the bound
            # replaces the initial guess only if larger.
            if back == 0 and (self.gop is not None or target - t > _INITIAL_GOP_S):
                self.gop = max(self.gop or 0.0, target - t)
            if t <= target + tolerance or at_start:
                break
            # Landed after the target (a poor index): retry further back.
            back = max(2 * back, self._seek_gap(), t - target)
        while t < target - tolerance:
            frame, t = self._next()
            if frame is None:
                return None, None
        return frame, t


def _tolerance(stream_fps: float | None, time_base) -> float:
    """How far before a target a frame may start and still be kept: half a frame period
    (nearest frame) plus a hair, so a target exactly between two frames (uniform centres
    when T = frame count) takes the earlier one despite float noise, and despite frame
    times rounded to a time base that is not a multiple of the period (mkv/webm store
    milliseconds: 1/24 s becomes 0.042 s)."""
    if not stream_fps:
        return 1e-6
    period = 1.0 / stream_fps
    hair = 1e-3 * period
    ticks = period / float(time_base) if time_base else 0.0
    if ticks and abs(ticks - round(ticks)) > 1e-6:  # frame times are rounded
        hair = max(hair, min(float(time_base), 0.25 * period))
    return 0.5 * period + hair


def _to_rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, resized to size=(height, width) by swscale when given."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    height, width = size
    return frame.to_ndarray(format="rgb24", width=width, height=height, interpolation=_INTERPOLATION)


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (height, width), got {size}")
    return height, width


def read_video(
    path: str | os.PathLike,
    *,
    max_frames: int,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    stats: dict | None = None,
) -> VideoClip:
    """Samples at most `max_frames` frames of a video file (mp4, webm, mkv, avi, ...).

    Targets come from `sample_timestamps` over the stream duration (header, else container
    header, else a decode pass); for each, the kept frame is the nearest one (ties to the
    earlier): the first frame whose time is >= target - half a frame period. Decoding seeks
    to the keyframe before a far target and streams forward to near ones (`_Decoder`),
    converting only kept frames to RGB (resized to size=(height, width) if given), so
    memory is O(kept frames), never the whole video.

    Returns a VideoClip: frames (T, H, W, 3) uint8, timestamps (T,) the kept frames' actual
    presentation times (seconds from the stream start), increasing. T < max_frames when the
    video has fewer frames than max_frames (one target per source frame at most).

    stats, if given, is filled with counters: decoded (frames decoded), seeks, kept,
    duration and duration_source ("stream", "container" or "decode").
    Raises VideoError naming the file for a missing, empty, corrupt (undecodable or
    truncated: decoding ends well before the duration the header claims) or unsupported
    (not a video, no video stream) file.
    """
    path = os.fspath(path)
    size = _check_size(size)
    stats = {} if stats is None else stats
    stats.update(decoded=0, seeks=0, kept=0)
    with _open(path) as container:
        stream = _video_stream(container, path)
        duration, source = _header_duration(container, stream)
        seekable = True
        if duration is None:
            (duration, seekable), source = _decoded_duration(path), "decode"
        stream_fps = _stream_fps(stream)
        stats.update(duration=duration, duration_source=source)
        targets = sample_timestamps(duration, max_frames=max_frames, fps=fps, stream_fps=stream_fps)
        tolerance = _tolerance(stream_fps, stream.time_base)
        decoder = _Decoder(container, stream, stats, seekable=seekable)
        frames, times, truncated = [], [], False
        try:
            for target in targets:
                frame, t = decoder.frame_at(float(target), tolerance)
                if frame is None:
                    # Past the end: the nearest frame is the last one, if the header did
                    # not overstate the length by more than _end_slack (else: truncated).
                    frame, t = decoder.last, decoder.position
                    if frame is None or target - t > _end_slack(source, stream_fps):
                        truncated = frame is not None or bool(frames)
                        break
                if times and t <= times[-1]:
                    continue  # two targets mapped to one frame (irregular stream, or the end)
                frames.append(_to_rgb(frame, size))
                times.append(t)
                del frame  # drop the decoded (full-resolution) frame before decoding on
        except av.FFmpegError as e:
            raise VideoError(path, f"corrupt video data ({_reason(e)})") from None
    stats["kept"] = len(frames)
    if not frames:
        raise VideoError(path, "no frames decodable")
    if truncated:
        raise VideoError(
            path,
            f"truncated or corrupt: decoding ended at {decoder.position:.3f} s but the "
            f"{source} header claims {duration:.3f} s",
        )
    return VideoClip(
        frames=np.stack(frames),
        timestamps=np.asarray(times, dtype=np.float64),
        source=path,
        fps=stream_fps,
        duration=duration,
    )


def _end_slack(source: str, stream_fps: float | None) -> float:
    """How far past the last decodable frame a target may lie before the file counts as
    truncated: two frame periods when the duration is the video stream's own, plus
    _CONTAINER_SLACK_S when it is the container's (audio may outlast the video)."""
    slack = 2.0 / stream_fps if stream_fps else 0.1
    return slack + (_CONTAINER_SLACK_S if source == "container" else 0.0)


def read_image(path: str | os.PathLike, *, size: tuple[int, int] | None = None) -> VideoClip:
    """One image (png, jpg, ... via FFmpeg's image2 demuxer; of a video, its first frame) as
    a VideoClip with T = 1.

    frames (1, H, W, 3) uint8 RGB (alpha dropped), resized to size=(height, width) if given;
    timestamps [0.0]; fps and duration None.
    """
    path = os.fspath(path)
    size = _check_size(size)
    with _open(path) as container:
        stream = _video_stream(container, path)
        try:
            frame = next(container.decode(stream), None)
            rgb = None if frame is None else _to_rgb(frame, size)
        except av.FFmpegError as e:
            raise VideoError(path, f"corrupt image data ({_reason(e)})") from None
    if rgb is None:
        raise VideoError(path, "no frames decodable")
    return VideoClip(frames=rgb[None], timestamps=np.zeros(1), source=path, fps=None, duration=None)


# --------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------


def frames_to_pixels(frames: np.ndarray, *, mean, std) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB -> float32 (T, 3, H, W): (frames / 255 - mean) / std per channel
    (mean, std: 3 values, RGB order, or scalars).

    Normalisation happens here because the RADIO input conditioner sits outside the model in
    the HF implementation (its video processor does the same).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    # a scalar applies to all three channels.
    mean = np.broadcast_to(np.asarray(mean, np.float32), (3,)).reshape(1, 3, 1, 1)
    std = np.broadcast_to(np.asarray(std, np.float32), (3,)).reshape(1, 3, 1, 1)
    pixels = frames.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return (pixels - mean) / std


def pack_tubelets(pixels: np.ndarray, temporal_patch: int) -> np.ndarray:
    """(T, C, H, W) -> (ceil(T / p), p * C, H, W), p = temporal_patch.

    Like HF NemotronH Omni: consecutive frames stack along channels frame-major (channel
    k * C + c of tubelet j is channel c of frame j * p + k), and a T that is not a multiple
    of p is padded by repeating the last frame.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[0] == 0:
        raise ValueError(f"pixels must be (T, C, H, W) with T >= 1, got {pixels.shape}")
    if temporal_patch < 1:
        raise ValueError(f"temporal_patch must be >= 1, got {temporal_patch}")
    t, c, h, w = pixels.shape
    pad = -t % temporal_patch
    if pad:
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
    return pixels.reshape(-1, temporal_patch * c, h, w)


# --------------------------------------------------------------------------------------
# Procedural test clip (tests and the demo's embedded default)
# --------------------------------------------------------------------------------------

# Frame index drawn as _INDEX_BITS black/white blocks in the bottom strip (MSB first);
# big flat blocks survive any codec and any resize.
_INDEX_BITS = 10
_STRIP_FRACTION = 8  # strip height = H / 8

# Preferred encoders per test-clip extension: the first one the PyAV wheel has wins.
TEST_CLIP_ENCODERS = {
    ".mp4": ("libx264", "mpeg4"),
    ".mov": ("libx264", "mpeg4"),
    ".mkv": ("libx264", "mpeg4", "ffv1"),
    ".webm": ("libvpx-vp9", "libvpx"),
    ".avi": ("mpeg4", "mjpeg"),
}


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # UnknownCodecError, or the decoder-only build
        return False
    return True


def pick_encoder(path: str | os.PathLike) -> str | None:
    """The encoder write_test_clip uses for a path or bare extension (".mp4"), or None when
    the PyAV build has none of TEST_CLIP_ENCODERS for it."""
    ext = os.path.splitext("x" + os.path.basename(os.fspath(path)))[1].lower()
    if ext not in TEST_CLIP_ENCODERS:
        raise ValueError(f"{path}: unsupported test clip extension {ext!r} (use {sorted(TEST_CLIP_ENCODERS)})")
    return next((c for c in TEST_CLIP_ENCODERS[ext] if _has_encoder(c)), None)


def _encoder_options(codec: str) -> dict[str, str]:
    # High quality so the drawn patterns survive; fast settings so tests stay quick.
    return {
        # scenecut=0: keyframes exactly every keyframe_interval frames, as tests assume.
        "libx264": {"preset": "veryfast", "crf": "18", "x264-params": "scenecut=0"},
        "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"},
        "libvpx": {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "2M"},
        "mpeg4": {"qscale": "3"},
        "mjpeg": {"qscale": "3"},
    }.get(codec, {})


def _pix_fmt(codec: str) -> str:
    return {"mjpeg": "yuvj420p", "ffv1": "yuv420p"}.get(codec, "yuv420p")


def synthetic_frame(index: int, num_frames: int, height: int, width: int) -> np.ndarray:
    """Frame `index` of the procedural clip, (H, W, 3) uint8 RGB, deterministic.

    A red/green gradient background, a white square moving left to right over the clip,
    and the frame index in binary in the bottom strip (see synthetic_frame_index).
    """
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[..., 0] = xs * 0.6 + 40
    rgb[..., 1] = ys * 0.6 + 40
    rgb[..., 2] = 90
    strip = height // _STRIP_FRACTION
    side = max(2, (height - strip) // 4)
    x = round(index * (width - side) / max(num_frames - 1, 1))
    y = (height - strip - side) // 2
    rgb[y : y + side, x : x + side] = 255
    rgb[height - strip :] = 0
    for bit in range(_INDEX_BITS):
        if index >> (_INDEX_BITS - 1 - bit) & 1:
            x0, x1 = bit * width // _INDEX_BITS, (bit + 1) * width // _INDEX_BITS
            rgb[height - strip :, x0:x1] = 255
    return rgb


def synthetic_frame_index(frame: np.ndarray) -> int:
    """Reads back the frame index drawn by synthetic_frame from an (H, W, 3) frame, at any
    size: each bit is the mean of the inner half of its block, thresholded at mid-grey."""
    height, width = frame.shape[:2]
    strip = max(1, height // _STRIP_FRACTION)
    gray = frame[height - strip :].astype(np.float32).mean(axis=-1)
    rows = gray[strip // 4 : strip - strip // 4 or None]
    value = 0
    for bit in range(_INDEX_BITS):
        x0, x1 = bit * width // _INDEX_BITS, (bit + 1) * width // _INDEX_BITS
        q = (x1 - x0) // 4
        value = value << 1 | int(rows[:, x0 + q : x1 - q or None].mean() > 127)
    return value


def write_test_clip(
    path: str | os.PathLike,
    *,
    num_frames: int = 48,
    fps: int = 24,
    height: int = 128,
    width: int = 160,
    codec: str | None = None,
    keyframe_interval: int | None = None,
) -> None:
    """Writes the procedural clip (synthetic_frame) to path; container by extension
    (.mp4, .mov, .mkv, .webm, .avi), encoder `codec` or the first available of TEST_CLIP_ENCODERS.

    keyframe_interval (frames, default fps = one keyframe a second) bounds what a seek must
    decode. Frame i has pts i in time base 1/fps, so its time is exactly i / fps.
    Raises ValueError when no encoder for the extension is in the PyAV build.
    """
    path = os.fspath(path)
    if num_frames < 1 or num_frames >= 1 << _INDEX_BITS:
        raise ValueError(f"num_frames must be in [1, {1 << _INDEX_BITS}), got {num_frames}")
    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even (4:2:0 chroma), got {height}x{width}")
    codec = codec or pick_encoder(path)
    if codec is None or not _has_encoder(codec):
        raise ValueError(f"{path}: no encoder available for this container in this PyAV build")
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps), options=_encoder_options(codec))
        stream.width, stream.height, stream.pix_fmt = width, height, _pix_fmt(codec)
        stream.time_base = Fraction(1, fps)
        stream.codec_context.gop_size = keyframe_interval or fps
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(i, num_frames, height, width), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush delayed (B-)frames


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Writes an (H, W, 3) uint8 RGB array as a single image (.png lossless, .jpg) with PyAV."""
    path = os.fspath(path)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    ext = os.path.splitext(path)[1].lower()
    codec, pix_fmt = {".png": ("png", "rgb24"), ".jpg": ("mjpeg", "yuvj444p"), ".jpeg": ("mjpeg", "yuvj444p")}.get(
        ext, (None, None)
    )
    if codec is None:
        raise ValueError(f"{path}: unsupported image extension {ext!r} (use .png or .jpg)")
    with av.open(path, mode="w", format="image2") as container:
        stream = container.add_stream(codec, rate=1)
        stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], pix_fmt
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
