"""Dialogue shards: one msgpack record per dialogue in ArrayRecord files.

A shard folder holds `manifest.json` and, per split, files named
`{split}-{i:05d}-of-{n:05d}.array_record`. The writer deals records round-robin
over a split's files, so record `i` of a split (in the order it was written)
lives in file `i % n` at position `i // n`; `DialogueShardSource` keeps that
order, whatever the number of files. The writer also puts TFDS's metadata
beside the files (mer_jax/data/tfds_metadata.py), so that
`tfds.builder_from_directory(shard_dir)` reads them in place; the manifest
lists only the data files, and readers ignore other files in the folder.

A record is a msgpack map whose arrays are stored as {dtype, shape, bytes} and
decoded with `np.frombuffer`: arrays of a decoded record are read-only views.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import os
import re
import threading
from typing import (Any, Iterable, Literal, Mapping, NamedTuple, Sequence,
                    SupportsIndex)
import uuid

from absl import logging
from array_record.python import array_record_module
from etils import epath
import msgpack
import numpy as np

from mer_jax import errors
from mer_jax.data import tfds_metadata

FORMAT = 'mer_jax.dialogue_shards/v1'
MANIFEST_NAME = 'manifest.json'
CHECKSUM_KEY = 'content_sha256'
DEFAULT_WRITER_OPTIONS = 'group_size:1'
_READER_OPTIONS = 'readahead_buffer_size:0'
_SPLIT_NAME = re.compile(r'^[A-Za-z0-9_]+$')
_ARRAY_DTYPES = {'<i4': np.int32, '<f4': np.float32, '|b1': np.bool_}


class ShardError(errors.UserError):
  """A shard folder, manifest or shard file is missing or inconsistent."""


class BadRecordError(ShardError):
  """A dialogue record fails validation or cannot be decoded."""


@dataclasses.dataclass(eq=False)
class DialogueRecord:
  """One dialogue: n utterances with labels and per-modality features."""

  dialogue_id: str
  utterance_ids: np.ndarray  # int32[n]
  speakers: list[str]  # speaker name per utterance
  speaker_ids: np.ndarray  # int32[n], rank by first appearance
  labels: np.ndarray  # int32[n], class index or -1 (unlabeled)
  transcripts: list[str]
  features: dict[str, np.ndarray]  # modality -> float32[n, d_m]
  present: dict[str, np.ndarray]  # modality -> bool[n]

  @property
  def num_utterances(self) -> int:
    return len(self.labels)


def speaker_ranks(speakers: Sequence[str]) -> np.ndarray:
  """Rank of each utterance's speaker by first appearance (0-based)."""
  ranks: dict[str, int] = {}
  return np.array([ranks.setdefault(s, len(ranks)) for s in speakers],
                  dtype=np.int32).reshape(-1)


# ---------------------------------------------------------------------------
# Validation.


def validate_record(record: DialogueRecord, dims: Mapping[str, int],
                    num_classes: int) -> None:
  """Raises ValueError describing the first problem with `record`."""
  if not isinstance(record.dialogue_id, str) or not record.dialogue_id:
    raise ValueError(f'dialogue_id must be a non-empty str, got '
                     f'{record.dialogue_id!r}')
  n = len(record.labels)
  if n < 1:
    raise ValueError('dialogue has no utterances')
  for key, dtype in (('utterance_ids', np.int32), ('speaker_ids', np.int32),
                     ('labels', np.int32)):
    _check_array(key, getattr(record, key), (n,), dtype)
  for key in ('speakers', 'transcripts'):
    values = getattr(record, key)
    if len(values) != n or not all(isinstance(v, str) for v in values):
      raise ValueError(f'{key} must be {n} strings, got {len(values)} items')
  if not np.array_equal(record.speaker_ids, speaker_ranks(record.speakers)):
    raise ValueError('speaker_ids do not match the ranks of speakers by first '
                     'appearance')
  labels = record.labels
  if np.any((labels < -1) | (labels >= num_classes)):
    raise ValueError(f'label out of range [-1, {num_classes}): '
                     f'{labels[(labels < -1) | (labels >= num_classes)][0]}')
  for field in ('features', 'present'):
    keys = set(getattr(record, field))
    if keys != set(dims):
      raise ValueError(f'{field} has modalities {sorted(keys)}, expected '
                       f'{sorted(dims)}')
  for m, d in dims.items():
    features, present = record.features[m], record.present[m]
    _check_array(f'features[{m!r}]', features, (n, d), np.float32)
    _check_array(f'present[{m!r}]', present, (n,), np.bool_)
    if not np.all(np.isfinite(features)):
      bad = int(np.argwhere(~np.isfinite(features))[0, 0])
      raise ValueError(f'features[{m!r}] has NaN/Inf (utterance {bad})')
    if np.any(features[~present]):
      raise ValueError(f'features[{m!r}] are non-zero where not present')


def _check_array(key: str, value: Any, shape: tuple[int, ...],
                 dtype: type[np.generic]) -> None:
  if not isinstance(value, np.ndarray):
    raise ValueError(f'{key} must be a numpy array, got {type(value).__name__}')
  if value.shape != shape or value.dtype != dtype:
    raise ValueError(f'{key} must be {np.dtype(dtype).name}{list(shape)}, got '
                     f'{value.dtype.name}{list(value.shape)}')


def _canonical(record: DialogueRecord, dims: Mapping[str, int]
               ) -> DialogueRecord:
  """Casts arrays to the stored dtypes and zeroes features where absent."""

  def cast(key: str, value: Any, kind: str, dtype: type[np.generic]):
    array = np.asarray(value)
    if array.dtype.kind not in kind:
      raise ValueError(f'{key} has dtype {array.dtype.name}, expected '
                       f'{np.dtype(dtype).name}')
    return np.ascontiguousarray(array, dtype=dtype)

  features, present = {}, {}
  for m in dims:
    if m not in record.features or m not in record.present:
      raise ValueError(f'modality {m!r} missing from features or present')
    present[m] = cast(f'present[{m!r}]', record.present[m], 'b', np.bool_)
    features[m] = cast(f'features[{m!r}]', record.features[m], 'fiu',
                       np.float32)
    if present[m].shape == features[m].shape[:1] and not present[m].all():
      features[m] = np.where(present[m][:, None], features[m], 0.0).astype(
          np.float32)
  for field in ('features', 'present'):
    extra = set(getattr(record, field)) - set(dims)
    if extra:
      raise ValueError(f'{field} has unknown modalities {sorted(extra)}')
  return DialogueRecord(
      dialogue_id=record.dialogue_id,
      utterance_ids=cast('utterance_ids', record.utterance_ids, 'iu', np.int32),
      speakers=list(record.speakers),
      speaker_ids=cast('speaker_ids', record.speaker_ids, 'iu', np.int32),
      labels=cast('labels', record.labels, 'iu', np.int32),
      transcripts=list(record.transcripts),
      features=features,
      present=present,
  )


# ---------------------------------------------------------------------------
# Serialization.


def _encode_array(array: np.ndarray) -> dict[str, Any]:
  return {'dtype': array.dtype.str, 'shape': list(array.shape),
          'bytes': array.tobytes()}


def _decode_array(value: Mapping[str, Any]) -> np.ndarray:
  dtype = _ARRAY_DTYPES.get(value['dtype'])
  if dtype is None:
    raise ValueError(f'unsupported array dtype {value["dtype"]!r}')
  shape = tuple(value['shape'])
  if math.prod(shape) * np.dtype(dtype).itemsize != len(value['bytes']):
    raise ValueError(f'array of shape {list(shape)} does not match its '
                     f'{len(value["bytes"])} bytes')
  return np.frombuffer(value['bytes'], dtype=dtype).reshape(shape)


def encode_record(record: DialogueRecord) -> bytes:
  return msgpack.packb({
      'dialogue_id': record.dialogue_id,
      'utterance_ids': _encode_array(record.utterance_ids),
      'speakers': list(record.speakers),
      'speaker_ids': _encode_array(record.speaker_ids),
      'labels': _encode_array(record.labels),
      'transcripts': list(record.transcripts),
      'features': {m: _encode_array(x) for m, x in record.features.items()},
      'present': {m: _encode_array(x) for m, x in record.present.items()},
  })


def decode_record(data: bytes,
                  modalities: Sequence[str] | None = None) -> DialogueRecord:
  """Decodes a record, keeping only `modalities` (all when None)."""
  try:
    raw = msgpack.unpackb(data)
    keep = list(raw['features']) if modalities is None else modalities
    return DialogueRecord(
        dialogue_id=raw['dialogue_id'],
        utterance_ids=_decode_array(raw['utterance_ids']),
        speakers=raw['speakers'],
        speaker_ids=_decode_array(raw['speaker_ids']),
        labels=_decode_array(raw['labels']),
        transcripts=raw['transcripts'],
        features={m: _decode_array(raw['features'][m]) for m in keep},
        present={m: _decode_array(raw['present'][m]) for m in keep},
    )
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'undecodable record: {type(e).__name__}: {e}') from e


# ---------------------------------------------------------------------------
# Manifest.


@dataclasses.dataclass(frozen=True)
class ShardFile:
  name: str
  num_records: int
  sha256: str
  size: int


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  """Per-split statistics; `dialogue_lengths` follows the record order."""

  files: tuple[ShardFile, ...]
  num_dialogues: int
  num_utterances: int
  class_counts: tuple[int, ...]
  max_dialogue_len: int
  dialogue_lengths: tuple[int, ...]
  missing: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class Manifest:
  """Contents of `manifest.json`."""

  format: str
  modalities: tuple[str, ...]
  dims: Mapping[str, int]
  label_names: tuple[str, ...]
  splits: Mapping[str, SplitInfo]
  # Whether the file's `content_sha256` matches its content (None: a manifest without one).
  checksum_ok: bool | None = dataclasses.field(default=None, compare=False)

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def to_json(self) -> dict[str, Any]:
    return {
        'format': self.format,
        'modalities': list(self.modalities),
        'dims': dict(self.dims),
        'label_names': list(self.label_names),
        'splits': {name: {
            'files': [dataclasses.asdict(f) for f in info.files],
            'num_dialogues': info.num_dialogues,
            'num_utterances': info.num_utterances,
            'class_counts': list(info.class_counts),
            'max_dialogue_len': info.max_dialogue_len,
            'dialogue_lengths': list(info.dialogue_lengths),
            'missing': dict(info.missing),
        } for name, info in self.splits.items()},
    }


def content_checksum(manifest_json: Mapping[str, Any]) -> str:
  """sha256 of a manifest's JSON content, less its own `content_sha256` entry."""
  content = {k: v for k, v in manifest_json.items() if k != CHECKSUM_KEY}
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str,
             path: epath.Path) -> Any:
  if not isinstance(obj, dict) or key not in obj:
    raise ShardError(f'{path}: missing key {where}{key!r}')
  value = obj[key]
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise ShardError(f'{path}: key {where}{key!r} has the wrong type '
                     f'({type(value).__name__})')
  return value


def _manifest_from_json(raw: Any, path: epath.Path) -> Manifest:
  """Parses and checks the manifest JSON; errors name the path and key."""
  fmt = _require(raw, 'format', str, '', path)
  if fmt != FORMAT:
    raise ShardError(f'{path}: unsupported format {fmt!r}, expected {FORMAT!r}')
  modalities = tuple(_require(raw, 'modalities', list, '', path))
  dims = _require(raw, 'dims', dict, '', path)
  for m in modalities:
    _require(dims, m, int, 'dims.', path)
  if set(dims) != set(modalities):
    raise ShardError(f'{path}: dims {sorted(dims)} do not match modalities '
                     f'{list(modalities)}')
  label_names = tuple(_require(raw, 'label_names', list, '', path))
  splits = {}
  for name, info in _require(raw, 'splits', dict, '', path).items():
    where = f'splits.{name}.'
    files = []
    for i, entry in enumerate(_require(info, 'files', list, where, path)):
      fw = f'{where}files[{i}].'
      files.append(ShardFile(
          name=_require(entry, 'name', str, fw, path),
          num_records=_require(entry, 'num_records', int, fw, path),
          sha256=_require(entry, 'sha256', str, fw, path),
          size=_require(entry, 'size', int, fw, path)))
    split = SplitInfo(
        files=tuple(files),
        num_dialogues=_require(info, 'num_dialogues', int, where, path),
        num_utterances=_require(info, 'num_utterances', int, where, path),
        class_counts=tuple(_require(info, 'class_counts', list, where, path)),
        max_dialogue_len=_require(info, 'max_dialogue_len', int, where, path),
        dialogue_lengths=tuple(
            _require(info, 'dialogue_lengths', list, where, path)),
        missing={m: _require(_require(info, 'missing', dict, where, path), m,
                             int, f'{where}missing.', path)
                 for m in modalities})
    _check_split(split, name, len(label_names), path)
    splits[name] = split
  checksum = raw.get(CHECKSUM_KEY)
  return Manifest(format=fmt, modalities=modalities, dims=dict(dims),
                  label_names=label_names, splits=splits,
                  checksum_ok=None if checksum is None else checksum == content_checksum(raw))


def _check_split(split: SplitInfo, name: str, num_classes: int,
                 path: epath.Path) -> None:
  n, num_files = split.num_dialogues, len(split.files)
  problems = []
  if not split.files:
    problems.append('no files')
  if len(split.dialogue_lengths) != n:
    problems.append(f'{len(split.dialogue_lengths)} dialogue_lengths for {n} '
                    'dialogues')
  if len(split.class_counts) != num_classes:
    problems.append(f'{len(split.class_counts)} class_counts for '
                    f'{num_classes} labels')
  for field, low in (('class_counts', 0), ('dialogue_lengths', 1)):
    values = getattr(split, field)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= low
               for v in values):
      problems.append(f'{field} must hold ints >= {low}')
  round_robin = [(n - k + num_files - 1) // max(num_files, 1)
                 for k in range(num_files)]
  if [f.num_records for f in split.files] != round_robin:
    problems.append('file num_records do not match a round-robin layout of '
                    f'{n} dialogues')
  if problems:
    raise ShardError(f'{path}: split {name!r} is inconsistent: '
                     + '; '.join(problems))


def load_manifest(shard_dir: epath.PathLike) -> Manifest:
  """Reads and checks `{shard_dir}/manifest.json`."""
  shard_dir = epath.Path(shard_dir)
  if not shard_dir.is_dir():
    raise ShardError(f'shard folder not found: {shard_dir}')
  path = shard_dir / MANIFEST_NAME
  if not path.exists():
    raise ShardError(f'manifest not found: {path} (incomplete or not a shard '
                     'folder)')
  return parse_manifest(path.read_text(), path)


def parse_manifest(text: str, path: epath.PathLike) -> Manifest:
  """Checks the text of a manifest read from `path` (named in errors)."""
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise ShardError(f'{path}: invalid JSON: {e}') from e
  return _manifest_from_json(raw, epath.Path(path))


def class_counts(source_or_manifest: DialogueShardSource | Manifest,
                 split: str | None = None) -> np.ndarray:
  """Label counts (labels >= 0) of a source's records or a manifest's split."""
  if isinstance(source_or_manifest, DialogueShardSource):
    return source_or_manifest.class_counts.copy()
  if split not in source_or_manifest.splits:
    raise ShardError(f'unknown split {split!r}; available: '
                     f'{sorted(source_or_manifest.splits)}')
  return np.asarray(source_or_manifest.splits[split].class_counts, np.int64)


# ---------------------------------------------------------------------------
# Writing.


def shard_file_name(split: str, index: int, num_files: int) -> str:
  return f'{split}-{index:05d}-of-{num_files:05d}.array_record'


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def _write_split(folder: epath.Path, out_dir: epath.Path, split: str,
                 records: Iterable[DialogueRecord], dims: Mapping[str, int],
                 num_classes: int, num_files: int,
                 writer_options: str) -> SplitInfo:
  """Validates and writes one split's records round-robin over its files."""
  names = [shard_file_name(split, i, num_files) for i in range(num_files)]
  writers = [array_record_module.ArrayRecordWriter(
      os.fspath(folder / name), writer_options) for name in names]
  lengths, seen = [], set()
  counts = np.zeros(num_classes, np.int64)
  missing = dict.fromkeys(dims, 0)
  try:
    for i, record in enumerate(records):
      where = (f'{out_dir / names[i % num_files]}: record {i // num_files} '
               f'(split {split!r} record {i}, dialogue_id='
               f'{getattr(record, "dialogue_id", None)!r})')
      try:
        record = _canonical(record, dims)
        validate_record(record, dims, num_classes)
      except (ValueError, TypeError, AttributeError) as e:
        raise BadRecordError(f'{where}: {e}') from e
      if record.dialogue_id in seen:
        raise BadRecordError(f'{where}: duplicate dialogue_id in split')
      seen.add(record.dialogue_id)
      writers[i % num_files].write(encode_record(record))
      lengths.append(record.num_utterances)
      labels = record.labels[record.labels >= 0]
      counts += np.bincount(labels, minlength=num_classes)
      for m in dims:
        missing[m] += int(np.sum(~record.present[m]))
  finally:
    for writer in writers:
      writer.close()
  if not lengths:
    raise ShardError(f'split {split!r} has no records')
  files = tuple(ShardFile(name=name, num_records=len(lengths[k::num_files]),
                          sha256=_sha256(folder / name),
                          size=(folder / name).stat().length)
                for k, name in enumerate(names))
  return SplitInfo(files=files, num_dialogues=len(lengths),
                   num_utterances=int(sum(lengths)),
                   class_counts=tuple(int(c) for c in counts),
                   max_dialogue_len=max(lengths),
                   dialogue_lengths=tuple(lengths), missing=missing)


def write_shards(out_dir: epath.PathLike,
                 splits: Mapping[str, Iterable[DialogueRecord]], *,
                 label_names: Sequence[str], dims: Mapping[str, int],
                 num_shards: int | Mapping[str, int], overwrite: bool = False,
                 writer_options: str = DEFAULT_WRITER_OPTIONS) -> Manifest:
  """Writes a shard folder atomically and returns its manifest.

  Records are validated while written; features of absent modalities are set
  to zero. TFDS metadata is written beside the shards (tfds_metadata.py).
  Everything goes to a hidden temporary folder next to `out_dir`,
  which is renamed into place once the manifest is written, so a crash never
  leaves a folder at `out_dir` that looks complete.

  Args:
    out_dir: the shard folder to create.
    splits: split name -> records, in the order they will be read back.
    label_names: class names; labels must be in [-1, len(label_names)).
    dims: modality -> feature dimension, in the order of the manifest.
    num_shards: files per split (one int for all splits, or per split).
    overwrite: replace an existing shard folder at `out_dir`.
    writer_options: ArrayRecordWriter options ('group_size:1' keeps random
      access cheap).

  Returns:
    The manifest written to `out_dir/manifest.json`.
  """
  out_dir = epath.Path(out_dir)
  if out_dir.exists() and not overwrite and (
      (out_dir / MANIFEST_NAME).exists() or any(out_dir.iterdir())):
    raise ShardError(f'{out_dir} already exists and is not empty; pass '
                     'overwrite=True to replace it')
  for split in splits:
    if not _SPLIT_NAME.match(split):
      raise ShardError(f'split name {split!r} must match {_SPLIT_NAME.pattern}')
    files = num_shards if isinstance(num_shards, int) else num_shards.get(split)
    if not isinstance(files, int) or files < 1:
      raise ShardError(f'num_shards for split {split!r} must be an int >= 1, '
                       f'got {files!r}')
  if not dims or any(not isinstance(d, int) or d < 1 for d in dims.values()):
    raise ShardError(f'dims must map modalities to ints >= 1, got {dims!r}')
  if not label_names or len(set(label_names)) != len(label_names):
    raise ShardError(f'label_names must be unique, got {label_names!r}')
  dims = dict(dims)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.parent / f'.{out_dir.name}.incomplete-{uuid.uuid4().hex[:8]}'
  tmp.mkdir()
  try:
    infos = {}
    for split, records in splits.items():
      files = num_shards if isinstance(num_shards, int) else num_shards[split]
      infos[split] = _write_split(tmp, out_dir, split, records, dims,
                                  len(label_names), files, writer_options)
    manifest = Manifest(format=FORMAT, modalities=tuple(dims), dims=dims,
                        label_names=tuple(label_names), splits=infos)
    content = manifest.to_json()
    content[CHECKSUM_KEY] = content_checksum(content)
    manifest_text = json.dumps(content, indent=1)
    (tmp / MANIFEST_NAME).write_text(manifest_text)
    tfds_metadata.write_metadata(tmp, manifest_text,
                                 name=tfds_metadata.config_name(out_dir.name))
    manifest = dataclasses.replace(manifest, checksum_ok=True)
    if out_dir.exists():
      old = out_dir.parent / f'.{out_dir.name}.old-{uuid.uuid4().hex[:8]}'
      out_dir.rename(old)
      tmp.rename(out_dir)
      old.rmtree()
    else:
      tmp.rename(out_dir)
  except BaseException:
    tmp.rmtree(missing_ok=True)
    raise
  logging.info('Wrote %s: %s', out_dir, {
      s: (i.num_dialogues, i.num_utterances) for s, i in infos.items()})
  return manifest


# ---------------------------------------------------------------------------
# Reading.


class SkippedRecord(NamedTuple):
  """A record left out by `on_bad_record='skip'`, and why."""

  file: str  # shard file name within the folder
  index: int  # record position within that file
  dialogue_id: str | None  # None when the record cannot be decoded
  reason: str


class DialogueShardSource:
  """Random access to the dialogues of one split (Grain data source).

  Files are checked at construction (present, size, sha256 when
  `verify_checksums`, readable with the expected number of records). Every
  record is validated when read; a bad one raises `BadRecordError`. With
  `on_bad_record='skip'` all records are validated once here and bad ones are
  left out of the index and listed in `skipped`.

  When the split's features fit in `cache_max_bytes`, each record is decoded and
  validated once and then served from memory (its arrays are read-only views of
  the record's bytes, so no reader can alter what the next one gets).
  """

  def __init__(self, shard_dir: epath.PathLike, split: str, *,
               modalities: Sequence[str] | None = None,
               verify_checksums: bool = True,
               on_bad_record: Literal['error', 'skip'] = 'error',
               cache_max_bytes: int = 0):
    if on_bad_record not in ('error', 'skip'):
      raise ValueError(f"on_bad_record must be 'error' or 'skip', got "
                       f'{on_bad_record!r}')
    self.shard_dir = epath.Path(shard_dir)
    self.split = split
    self.manifest = load_manifest(self.shard_dir)
    if split not in self.manifest.splits:
      raise ShardError(f'{self.shard_dir}: unknown split {split!r}; available:'
                       f' {sorted(self.manifest.splits)}')
    if modalities is None:
      modalities = self.manifest.modalities
    unknown = set(modalities) - set(self.manifest.modalities)
    if unknown:
      raise ShardError(f'{self.shard_dir}: unknown modalities {sorted(unknown)}'
                       f'; available: {list(self.manifest.modalities)}')
    self.modalities = tuple(modalities)
    self.dims = {m: self.manifest.dims[m] for m in self.modalities}
    self._info = self.manifest.splits[split]
    self._paths = [self.shard_dir / f.name for f in self._info.files]
    self._readers = [self._open_checked(p, f, verify_checksums)
                     for p, f in zip(self._paths, self._info.files)]
    self._lock = threading.Lock()
    if self.manifest.checksum_ok is not True:
      self._verify_manifest()
    feature_bytes = 4 * self._info.num_utterances * sum(self.dims.values())
    self._cache: dict[int, DialogueRecord] | None = (
        {} if 0 < feature_bytes <= cache_max_bytes else None)
    self.skipped: list[SkippedRecord] = []
    self._index = np.arange(self._info.num_dialogues, dtype=np.int64)
    self.class_counts = np.asarray(self._info.class_counts, np.int64)
    if on_bad_record == 'skip':
      self._scan_and_skip()
    self.dialogue_lengths = np.asarray(
        self._info.dialogue_lengths, np.int32)[self._index]

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  @property
  def label_names(self) -> tuple[str, ...]:
    return self.manifest.label_names

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: SupportsIndex) -> DialogueRecord:
    i = operator.index(index)
    if not -len(self) <= i < len(self):
      raise IndexError(f'record {i} out of range for {len(self)} records')
    record = self._read(int(self._index[i]))
    if isinstance(record, SkippedRecord):
      raise BadRecordError(self._describe(record))
    return record

  @property
  def caches_records(self) -> bool:
    return self._cache is not None

  def __repr__(self) -> str:
    return (f'DialogueShardSource(shard_dir={os.fspath(self.shard_dir)!r}, '
            f'split={self.split!r}, num_records={len(self)}, '
            f'modalities={self.modalities}, num_skipped={self.num_skipped})')

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    state['_readers'] = [None] * len(self._paths)
    if state['_cache'] is not None:  # each process fills its own
      state['_cache'] = {}
    del state['_lock']
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _open_checked(self, path: epath.Path, entry: ShardFile,
                    verify_checksums: bool):
    if not path.exists():
      raise ShardError(f'shard file missing: {path}')
    size = path.stat().length
    if size != entry.size:
      raise ShardError(f'{path}: size {size} differs from the manifest '
                       f'({entry.size}); the file is truncated or replaced')
    if verify_checksums and _sha256(path) != entry.sha256:
      raise ShardError(f'{path}: sha256 checksum mismatch with the manifest')
    reader = self._open(path)
    if reader.num_records() != entry.num_records:
      raise ShardError(f'{path}: holds {reader.num_records()} records, the '
                       f'manifest says {entry.num_records}')
    return reader

  def _verify_manifest(self) -> None:
    """Recounts the split from its records when the manifest has no checksum, and every split
    when its checksum does not match (it was edited): a difference names the split and field."""
    edited = self.manifest.checksum_ok is False
    path = self.shard_dir / MANIFEST_NAME
    for name in (self.manifest.splits if edited else (self.split,)):
      problem = _recount_problem(self.shard_dir, self.manifest, name)
      if problem:
        raise ShardError(f'{path}: split {name!r} {problem}'
                         + (' (the manifest was edited after it was written: its '
                            f'{CHECKSUM_KEY} does not match)' if edited else ''))
    if edited:
      raise ShardError(f'{path}: edited after it was written ({CHECKSUM_KEY} does not match '
                       'its content); the splits still match their records, so label_names, '
                       'dims or file entries changed. Restore the manifest or rewrite the '
                       'shards.')

  def _open(self, path: epath.Path):
    try:
      reader = array_record_module.ArrayRecordReader(os.fspath(path),
                                                     _READER_OPTIONS)
    except (RuntimeError, ValueError) as e:
      raise ShardError(f'{path}: unreadable ArrayRecord file: {e}') from e
    if not reader.ok():
      raise ShardError(f'{path}: unreadable ArrayRecord file (truncated or '
                       'corrupted)')
    return reader

  def _reader(self, file_index: int):
    if self._readers[file_index] is None:
      with self._lock:
        if self._readers[file_index] is None:
          self._readers[file_index] = self._open(self._paths[file_index])
    return self._readers[file_index]

  def _read(self, global_index: int) -> DialogueRecord | SkippedRecord:
    """Reads and validates a record (or takes it from the cache); returns it or
    what is wrong with it."""
    if self._cache is not None:
      record = self._cache.get(global_index)
      if record is None:
        record = self._read_file(global_index)
        if isinstance(record, DialogueRecord):
          self._cache[global_index] = record
      return record
    return self._read_file(global_index)

  def _read_file(self, global_index: int) -> DialogueRecord | SkippedRecord:
    num_files = len(self._paths)
    file_index, position = global_index % num_files, global_index // num_files
    name = self._info.files[file_index].name
    try:
      data = self._reader(file_index).read([position])[0]
    except RuntimeError as e:
      return SkippedRecord(name, position, None, f'unreadable: {e}')
    try:
      record = decode_record(data, self.modalities)
      validate_record(record, self.dims, self.manifest.num_classes)
    except ValueError as e:
      return SkippedRecord(name, position, _peek_dialogue_id(data), str(e))
    expected = self._info.dialogue_lengths[global_index]
    if record.num_utterances != expected:
      return SkippedRecord(name, position, record.dialogue_id,
                           f'holds {record.num_utterances} utterances, the manifest says '
                           f'{expected} (dialogue_lengths[{global_index}] of split '
                           f'{self.split!r})')
    return record

  def _scan_and_skip(self) -> None:
    good = []
    counts = np.zeros(self.manifest.num_classes, np.int64)
    for i in range(self._info.num_dialogues):
      record = self._read(i)
      if isinstance(record, SkippedRecord):
        self.skipped.append(record)
        continue
      good.append(i)
      counts += np.bincount(record.labels[record.labels >= 0],
                            minlength=len(counts))
    self._index = np.asarray(good, np.int64)
    self.class_counts = counts
    if self.skipped:
      logging.warning('%s split %r: skipped %d of %d bad records (first: %s)',
                      self.shard_dir, self.split, len(self.skipped),
                      self._info.num_dialogues,
                      self._describe(self.skipped[0]))
    else:
      logging.info('%s split %r: all %d records valid', self.shard_dir,
                   self.split, self._info.num_dialogues)

  def _describe(self, bad: SkippedRecord) -> str:
    return (f'{self.shard_dir / bad.file}: record {bad.index} '
            f'(dialogue_id={bad.dialogue_id!r}): {bad.reason}')


def _recount_problem(shard_dir: epath.Path, manifest: Manifest,
                     split: str) -> str | None:
  """The first manifest field of `split` its records contradict, described; None if none."""
  info = manifest.splits[split]
  num_files = len(info.files)
  readers = [array_record_module.ArrayRecordReader(
      os.fspath(shard_dir / f.name), _READER_OPTIONS) for f in info.files]
  lengths, ids = [], []
  counts = np.zeros(manifest.num_classes, np.int64)
  missing = dict.fromkeys(manifest.modalities, 0)
  try:
    for i in range(info.num_dialogues):
      data = readers[i % num_files].read([i // num_files])[0]
      try:
        record = decode_record(data, manifest.modalities)
      except ValueError:
        return None  # a bad record: reported, with its file, when it is read
      lengths.append(record.num_utterances)
      ids.append(record.dialogue_id)
      labels = record.labels[(record.labels >= 0) & (record.labels < len(counts))]
      counts += np.bincount(labels, minlength=len(counts))
      for m in missing:
        missing[m] += int(np.sum(~record.present[m]))
  finally:
    for reader in readers:
      reader.close()
  for i, (said, held) in enumerate(zip(info.dialogue_lengths, lengths)):
    if said != held:
      return (f'dialogue_lengths[{i}] (dialogue_id {ids[i]!r}): the manifest says {said}, '
              f'the record holds {held} utterances')
  recounted = {'class_counts': [int(c) for c in counts], 'num_utterances': sum(lengths),
               'max_dialogue_len': max(lengths, default=0), 'missing': missing}
  said = {'class_counts': list(info.class_counts), 'num_utterances': info.num_utterances,
          'max_dialogue_len': info.max_dialogue_len, 'missing': dict(info.missing)}
  for field, value in recounted.items():
    if said[field] != value:
      return f'{field}: the manifest says {said[field]}, its records hold {value}'
  return None


def _peek_dialogue_id(data: bytes) -> str | None:
  try:
    value = msgpack.unpackb(data).get('dialogue_id')
    return value if isinstance(value, str) else None
  except Exception:  # pylint: disable=broad-except
    return None
