"""SynthVideoQA as a TFDS dataset (array_record files, read back without TensorFlow).

    path = prepare(data_dir, num_frames=32, split_sizes={"train": 2000, "validation": 200, "test": 200})
    source = synth_source(data_dir, "validation", num_frames=32)   # len + [i] -> VideoQARecord

Layout: `<data_dir>/synth_video_qa/<config>/1.0.0/` with one array_record file per
split. Configs are named by frame count, `frames16` ... `frames256` (128x128 frames,
base seed 0: the released data); other frame sizes or base seeds get their own
names, e.g. `frames16_size64`, `frames32_seed7` (`config_name`).

Splits come from disjoint generator seeds: split s of base seed b is
`synth.split_seed(b, s)` = 3b + (0 train, 1 validation, 2 test), and example i of a
split is `synth.generate(split_seed, i, num_frames=..., size=...)`: the same record
`SynthSource(split_seed(b, s), n, num_frames)` gives. Examples are stored in index
order (shuffling disabled), so `source[i]` is example i.

Features (only Tensor, Text, Sequence(Text) and Scalar: TFDS reads those without
TensorFlow; Image/Video features would need it): `frames` (T, S, S, 3) uint8 Tensor
with ZLIB encoding; `timestamps` and the ground-truth arrays of `record.meta` as
raw-bytes Tensors (exact dtype, no int64 upcast); uid, question, task as Text;
options as Sequence(Text); answer, seed, index as Scalars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from hybridvlm.data import synth
from hybridvlm.data.records import VideoQARecord

NAME = "synth_video_qa"
VERSION = "1.0.0"
FRAME_COUNTS = (16, 32, 64, 128, 256)
DEFAULT_SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}
# The ground-truth arrays of record.meta: name -> (shape with T for num_frames, dtype).
META_ARRAYS = {
    "frame_shape": (("T",), np.int32),
    "frame_color": (("T",), np.int32),
    "frame_center": (("T", 2), np.float64),
    "frame_size": (("T",), np.float64),
    "events": ((None, 4), np.int32),
    "answer_frames": (("T",), np.bool_),
}


def config_name(num_frames: int, size: int = synth.DEFAULT_SIZE, base_seed: int = 0) -> str:
    """"frames32"; "_size64" / "_seed7" appended when size / base seed differ from 128 / 0."""
    name = f"frames{num_frames}"
    if size != synth.DEFAULT_SIZE:
        name += f"_size{size}"
    if base_seed != 0:
        name += f"_seed{base_seed}"
    return name


@dataclasses.dataclass(eq=False)
class SynthVideoQAConfig(tfds.core.BuilderConfig):
    """A SynthVideoQA variant: frames per video, frame side (pixels), base seed of the splits."""

    num_frames: int = synth.DEFAULT_FRAMES
    size: int = synth.DEFAULT_SIZE
    base_seed: int = 0


def _config(num_frames: int, size: int = synth.DEFAULT_SIZE, base_seed: int = 0) -> SynthVideoQAConfig:
    return SynthVideoQAConfig(name=config_name(num_frames, size, base_seed), num_frames=num_frames, size=size,
                              base_seed=base_seed,
                              description=f"{num_frames} frames of {size}x{size}, base seed {base_seed}")


_REGISTERED = {c.name: c for c in (_config(n) for n in FRAME_COUNTS)}


def make_config(num_frames: int, size: int = synth.DEFAULT_SIZE, base_seed: int = 0) -> SynthVideoQAConfig:
    """The registered config of this variant (frames16 ... frames256), else a new custom one."""
    synth.check_args(base_seed, num_frames, size)
    name = config_name(num_frames, size, base_seed)
    return _REGISTERED.get(name) or _config(num_frames, size, base_seed)


def features(num_frames: int, size: int) -> tfds.features.FeaturesDict:
    """The feature spec of one example (see the module docstring)."""
    raw = tfds.features.Encoding.BYTES
    arrays = {name: tfds.features.Tensor(shape=tuple(num_frames if d == "T" else d for d in shape), dtype=dtype,
                                         encoding=raw)
              for name, (shape, dtype) in META_ARRAYS.items()}
    return tfds.features.FeaturesDict({
        "uid": tfds.features.Text(),
        "question": tfds.features.Text(),
        "options": tfds.features.Sequence(tfds.features.Text()),
        "answer": tfds.features.Scalar(dtype=np.int32),
        "task": tfds.features.Text(),
        "frames": tfds.features.Tensor(shape=(num_frames, size, size, 3), dtype=np.uint8,
                                       encoding=tfds.features.Encoding.ZLIB),
        "timestamps": tfds.features.Tensor(shape=(num_frames,), dtype=np.float64, encoding=raw),
        "seed": tfds.features.Scalar(dtype=np.int64),
        "index": tfds.features.Scalar(dtype=np.int64),
        **arrays,
    })


def to_example(record: VideoQARecord) -> dict:
    """A SynthVideoQA record as a TFDS example dict (`features`)."""
    m = record.meta
    return dict(uid=record.uid, question=record.question, options=list(record.options), answer=record.answer,
                task=record.task, frames=record.frames, timestamps=record.timestamps, seed=m["seed"],
                index=m["index"], **{name: m[name] for name in META_ARRAYS})


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def from_example(example: Mapping) -> VideoQARecord:
    """The VideoQARecord of a decoded TFDS example: exactly the one `to_example` was given."""
    meta = dict(seed=int(example["seed"]), index=int(example["index"]))
    meta.update({name: np.asarray(example[name], dtype=dtype) for name, (_, dtype) in META_ARRAYS.items()})
    return VideoQARecord(uid=_text(example["uid"]), question=_text(example["question"]),
                         options=tuple(_text(o) for o in example["options"]), answer=int(example["answer"]),
                         task=_text(example["task"]), frames=np.asarray(example["frames"], dtype=np.uint8),
                         timestamps=np.asarray(example["timestamps"], dtype=np.float64), meta=meta)


class SynthVideoQA(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of SynthVideoQA (see the module docstring); write with `prepare`."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "First release."}
    BUILDER_CONFIGS = list(_REGISTERED.values())
    DEFAULT_CONFIG_NAME = "frames32"

    def __init__(self, *, split_sizes: Mapping[str, int] | None = None, progress: bool = False, **kwargs):
        """split_sizes: examples per split (default DEFAULT_SPLIT_SIZES; 0 leaves a split out);
        progress: show a tqdm bar per split while generating. Other kwargs go to TFDS
        (data_dir, config, file_format, ...)."""
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self._split_sizes = dict(DEFAULT_SPLIT_SIZES if split_sizes is None else split_sizes)
        self._progress = progress

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=("SynthVideoQA: procedurally generated multiple-choice questions (colour, shape, "
                         "order, count) about coloured shapes in noisy videos; see hybridvlm/data/synth.py."),
            features=features(cfg.num_frames, cfg.size),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to download
        return {split: self._generate_examples(split, n) for split, n in self._split_sizes.items() if n > 0}

    def _generate_examples(self, split: str, num_examples: int):
        cfg = self.builder_config
        seed = synth.split_seed(cfg.base_seed, split)
        for i in tqdm.tqdm(range(num_examples), desc=f"{NAME}/{cfg.name} {split}", unit="example",
                           disable=not self._progress):
            yield i, to_example(synth.generate(seed, i, num_frames=cfg.num_frames, size=cfg.size))

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """None: no checksums or metadata files live next to this code. (TFDS would otherwise
        probe the package through `importlib_resources`, which it does not install.)"""
        return None

    # TFDS prints where it writes, which is prepare()'s temporary directory: callers report instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


class _NoCustomConfigWarning(logging.Filter):
    """Drops TFDS's warning "Using custom data configuration" (expected for sizes / seeds off the defaults)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")


@contextlib.contextmanager
def _custom_config_quietly():
    absl_logger, quiet = logging.getLogger("absl"), _NoCustomConfigWarning()
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)


def dataset_path(data_dir: str, num_frames: int, size: int = synth.DEFAULT_SIZE, base_seed: int = 0) -> str:
    """Where a variant's files live: <data_dir>/synth_video_qa/<config>/1.0.0."""
    return os.path.join(data_dir, NAME, config_name(num_frames, size, base_seed), VERSION)


def prepare(data_dir: str, num_frames: int = synth.DEFAULT_FRAMES, *, size: int = synth.DEFAULT_SIZE,
            base_seed: int = 0, split_sizes: Mapping[str, int] | None = None, progress: bool = False) -> str:
    """Generates and writes a variant into data_dir; returns `dataset_path(...)`.

    Everything is built in a temporary directory inside data_dir and renamed into
    place at the end, so an error or an interrupt leaves nothing behind (a kill -9
    leaves a hidden ".prepare_synth-*" directory, never a readable half dataset).
    Raises FileExistsError when the variant is already there, ValueError for bad sizes.
    """
    config = make_config(num_frames, size, base_seed)
    sizes = dict(DEFAULT_SPLIT_SIZES if split_sizes is None else split_sizes)
    if set(sizes) - set(synth.SPLITS) or any(n < 0 for n in sizes.values()) or not any(sizes.values()):
        raise ValueError(f"split_sizes must map some of {synth.SPLITS} to >= 0 examples, at least one > 0; "
                         f"got {sizes}")
    final = dataset_path(data_dir, num_frames, size, base_seed)
    if os.path.exists(final):
        raise FileExistsError(17, "already exists (delete it to prepare it again)", final)
    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".prepare_synth-", dir=data_dir)
    try:
        with _custom_config_quietly():
            builder = SynthVideoQA(data_dir=tmp, config=config, split_sizes=sizes, progress=progress)
        builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(os.path.join(tmp, NAME, config.name, VERSION), final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class TFDSSynthSource:
    """A random-access source of the VideoQARecords of one prepared split.

    len(source) and source[i] (example i of the split); wraps `tfds.data_source`,
    opened on first use. Picklable: it pickles its arguments, not the open files,
    so each grain worker opens its own.
    """

    def __init__(self, data_dir: str, split: str, num_frames: int = synth.DEFAULT_FRAMES, *,
                 size: int = synth.DEFAULT_SIZE, base_seed: int = 0):
        if split not in synth.SPLITS:
            raise ValueError(f"split {split!r} is not one of {synth.SPLITS}")
        path = dataset_path(data_dir, num_frames, size, base_seed)
        if not os.path.isfile(os.path.join(path, "dataset_info.json")):
            raise FileNotFoundError(2, "no prepared SynthVideoQA here (run python -m hybridvlm.data.prepare_synth)",
                                    path)
        self.data_dir, self.split, self.num_frames = os.fspath(data_dir), split, int(num_frames)
        self.size, self.base_seed = int(size), int(base_seed)
        self._source = None

    @property
    def source(self):
        """The underlying `tfds.data_source` (dicts of numpy arrays and bytes)."""
        if self._source is None:
            name = f"{NAME}/{config_name(self.num_frames, self.size, self.base_seed)}:{VERSION}"
            try:
                self._source = tfds.data_source(name, split=self.split, data_dir=self.data_dir)
            except (KeyError, ValueError) as e:
                raise ValueError(f"{dataset_path(self.data_dir, self.num_frames, self.size, self.base_seed)}: "
                                 f"cannot read split {self.split!r} ({e})") from e
        return self._source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> VideoQARecord:
        n = len(self)
        i = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        return from_example(self.source[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}

    def __repr__(self) -> str:
        return (f"TFDSSynthSource(data_dir={self.data_dir!r}, split={self.split!r}, num_frames={self.num_frames}, "
                f"size={self.size}, base_seed={self.base_seed})")


def synth_source(data_dir: str, split: str, num_frames: int = synth.DEFAULT_FRAMES, *,
                 size: int = synth.DEFAULT_SIZE, base_seed: int = 0) -> TFDSSynthSource:
    """The prepared split `split` of the variant (num_frames, size, base_seed) under data_dir.

    Raises FileNotFoundError when that variant was not prepared there, ValueError for an unknown split.
    """
    return TFDSSynthSource(data_dir, split, num_frames, size=size, base_seed=base_seed)
