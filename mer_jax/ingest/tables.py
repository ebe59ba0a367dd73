"""A generic layout for any corpus: an index CSV plus one feature file per modality.

The index CSV has one row per utterance, with columns (names configurable, see `Columns`):
dialogue (one column, or several that together identify a dialogue, e.g. season, episode,
scene), utterance (an integer: the order within the dialogue), speaker, label (a class name;
empty for an unlabelled utterance), split (train, dev or test; valid, val and validation mean
dev) and, optionally, text (the transcript).

Each modality ('t', 'a' or 'v') has one feature file whose rows are either aligned with the index
(row i holds the features of the index's i-th utterance) or keyed by an id (the index's `id`
column names each utterance):

  .npy  a 2-D array, aligned;
  .npz  a single 2-D array (aligned); or the arrays `ids` and `features` (keyed); or one 1-D
        array per utterance, named by its id (keyed);
  .csv  a header row, then numbers only (aligned), or with a column named like the index's id
        column (keyed), every other column a feature.

With missing='absent', an utterance a keyed file lacks, or whose aligned row is all NaN, has that
modality marked absent (zeros, present=False) instead of refusing the file.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from mer_jax import stages
from mer_jax.ingest import common

SPLIT_ALIASES = {'train': 'train', 'dev': 'dev', 'valid': 'dev', 'val': 'dev',
                 'validation': 'dev', 'test': 'test'}
Missing = Literal['error', 'absent']


@dataclasses.dataclass(frozen=True)
class Columns:
  """Column names of the index CSV."""

  dialogue: tuple[str, ...] = ('dialogue',)
  utterance: str = 'utterance'
  speaker: str = 'speaker'
  label: str = 'label'
  split: str = 'split'
  text: str = 'text'  # optional: without this column, transcripts are empty
  id: str = ''  # the key of keyed feature rows; '' when every feature file is aligned


@dataclasses.dataclass(frozen=True)
class _Row:
  line: int
  dialogue: str
  utterance: int
  speaker: str
  label: str
  split: str
  text: str
  key: str


@dataclasses.dataclass(frozen=True)
class _Features:
  """A modality's feature file: its rows, and id -> row where keyed."""

  path: str
  rows: np.ndarray  # float32[k, d]
  index: dict[str, int] | None  # None: aligned with the index CSV


def _read_index(path: str, columns: Columns) -> list[_Row]:
  try:
    f = open(path, newline='', encoding='utf-8-sig')
  except OSError as e:
    raise common.IngestError(f'{path}: cannot open the index CSV ({e.strerror})') from e
  with f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    required = {'dialogue_column': columns.dialogue, 'utterance_column': (columns.utterance,),
                'speaker_column': (columns.speaker,), 'label_column': (columns.label,),
                'split_column': (columns.split,), 'id_column': (columns.id,) if columns.id else ()}
    for flag, names in required.items():
      for name in names:
        if name not in header:
          raise common.IngestError(f'{path}: no column {name!r} ({flag}); the header has '
                                   f'{header}')
    rows = [_parse_row(path, reader.line_num, raw, columns) for raw in reader]
  if not rows:
    raise common.IngestError(f'{path}: the index has no rows')
  return rows


def _parse_row(path: str, line: int, raw: dict[str, Any], columns: Columns) -> _Row:
  if None in raw or any(v is None for v in raw.values()):
    raise common.IngestError(f'{path}: line {line}: has a different number of cells than the '
                             'header')
  dialogue = '/'.join(raw[c].strip() for c in columns.dialogue)
  where = f'{path}: line {line} (dialogue {dialogue!r})'
  if not all(raw[c].strip() for c in columns.dialogue):
    raise common.IngestError(f'{where}: empty {"/".join(columns.dialogue)}')
  try:
    utterance = int(raw[columns.utterance])
  except ValueError:
    raise common.IngestError(f'{where}: {columns.utterance} {raw[columns.utterance]!r} is not '
                             'an integer') from None
  if not np.iinfo(np.int32).min <= utterance <= np.iinfo(np.int32).max:
    raise common.IngestError(f'{where}: {columns.utterance} {utterance} is outside int32')
  split = SPLIT_ALIASES.get(raw[columns.split].strip().lower())
  if split is None:
    raise common.IngestError(f'{where}: {columns.split} {raw[columns.split]!r} is not train, '
                             'dev (valid) or test')
  speaker = raw[columns.speaker].strip()
  if not speaker:
    raise common.IngestError(f'{where}: empty {columns.speaker}')
  return _Row(line=line, dialogue=dialogue, utterance=utterance, speaker=speaker,
              label=raw[columns.label].strip(), split=split,
              text=raw.get(columns.text) or '', key=raw[columns.id].strip() if columns.id else '')


def _numbers(path: str, table: np.ndarray) -> np.ndarray:
  if table.ndim != 2 or table.dtype.kind not in 'biuf' or table.shape[1] < 1:
    raise common.IngestError(f'{path}: expected a 2-D array of numbers, got '
                             f'{table.dtype.name}{list(table.shape)}')
  return table.astype(np.float32)


def _keyed(path: str, ids: Sequence[Any], rows: np.ndarray) -> _Features:
  index: dict[str, int] = {}
  for i, key in enumerate(ids):
    key = str(key)
    if key in index:
      raise common.IngestError(f'{path}: id {key!r} has two rows ({index[key]} and {i})')
    index[key] = i
  return _Features(path, rows, index)


def _read_npz(path: str) -> _Features:
  with np.load(path, allow_pickle=False) as npz:
    names = list(npz.files)
    if len(names) == 1:
      return _Features(path, _numbers(path, npz[names[0]]), None)
    if {'ids', 'features'} <= set(names):
      ids, rows = npz['ids'], _numbers(path, npz['features'])
      if ids.ndim != 1 or len(ids) != len(rows):
        raise common.IngestError(f'{path}: ids has shape {list(ids.shape)}, expected '
                                 f'[{len(rows)}] (one per row of features)')
      return _keyed(path, ids.tolist(), rows)
    vectors = [npz[name] for name in names]
    for name, v in zip(names, vectors):
      if v.ndim != 1:
        raise common.IngestError(f'{path}: member {name!r} has shape {list(v.shape)}; an npz of '
                                 'one array per utterance holds 1-D vectors')
    if len({len(v) for v in vectors}) > 1:
      raise common.IngestError(f'{path}: its per-utterance vectors have different lengths')
    return _keyed(path, names, _numbers(path, np.stack(vectors)))


def _read_csv(path: str, id_column: str) -> _Features:
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if not header:
      raise common.IngestError(f'{path}: empty (expected a header row)')
    key_at = header.index(id_column) if id_column and id_column in header else None
    keys, rows = [], []
    for line, cells in enumerate(reader, start=2):
      if len(cells) != len(header):
        raise common.IngestError(f'{path}: line {line} has {len(cells)} cells, the header '
                                 f'{len(header)}')
      if key_at is not None:
        keys.append(cells.pop(key_at).strip())
      try:
        rows.append([float(c) for c in cells])
      except ValueError:
        bad = next(c for c in cells if not _is_float(c))
        raise common.IngestError(f'{path}: line {line}: {bad!r} is not a number') from None
  table = _numbers(path, np.asarray(rows, np.float64).reshape(len(rows), -1))
  return _Features(path, table, None) if key_at is None else _keyed(path, keys, table)


def _is_float(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def read_features(path: str, id_column: str = '') -> _Features:
  """A modality's feature file (.npy, .npz or .csv)."""
  ext = os.path.splitext(path)[1].lower()
  if not os.path.isfile(path):
    raise common.IngestError(f'{path}: no such feature file')
  try:
    if ext == '.npy':
      return _Features(path, _numbers(path, np.load(path, allow_pickle=False)), None)
    if ext == '.npz':
      return _read_npz(path)
    if ext == '.csv':
      return _read_csv(path, id_column)
  except (ValueError, OSError, EOFError) as e:
    if isinstance(e, common.IngestError):
      raise
    raise common.IngestError(f'{path}: unreadable {ext} feature file ({e})') from e
  raise common.IngestError(f'{path}: feature files are .npy, .npz or .csv')


def _check_layout(features: _Features, num_rows: int, columns: Columns, index_path: str) -> None:
  if features.index is None and len(features.rows) != num_rows:
    raise common.IngestError(f'{features.path}: {len(features.rows)} rows, {index_path} has '
                             f'{num_rows} (rows aligned with the index; or key them by an id '
                             'column, see id_column)')
  if features.index is not None and not columns.id:
    raise common.IngestError(f'{features.path}: its rows are keyed by id; set id_column to the '
                             f'column of {index_path} that holds the ids')


def _feature_of(features: _Features, m: str, i: int, row: _Row, where: str,
                missing: Missing) -> np.ndarray | None:
  """The features of index row `i` (None: absent), checked."""
  if features.index is None:
    vector = features.rows[i]
  else:
    at = features.index.get(row.key)
    if at is None:
      if missing == 'absent':
        return None
      raise common.IngestError(f'{where}: {m} features: id {row.key!r} is not in '
                               f'{features.path}')
    vector = features.rows[at]
  finite = np.isfinite(vector)
  if missing == 'absent' and not finite.any():
    return None
  if not finite.all():
    raise common.IngestError(f'{where}: {m} features ({features.path}) have NaN or Inf')
  return vector


def read(index_path: str | os.PathLike[str], features: Mapping[str, str | os.PathLike[str]], *,
         columns: Columns = Columns(), label_names: Sequence[str] | None = None,
         missing: Missing = 'error') -> common.Corpus:
  """The dialogues of an index CSV and its modalities' feature files.

  Args:
    index_path: the index CSV.
    features: modality ('t', 'a' or 'v') -> its feature file.
    columns: the index's column names.
    label_names: the classes in index order; default: the labels found, sorted.
    missing: 'error' refuses an utterance without features; 'absent' marks it absent.
  """
  index_path = os.fspath(index_path)
  if not features:
    raise common.IngestError('tables: give at least one modality feature file')
  unknown = [m for m in features if m not in stages.MODALITIES]
  if unknown:
    raise common.IngestError(f'tables: modalities are {", ".join(stages.MODALITIES)} (text, audio,'
                             f' visual); got {unknown}')
  if missing not in ('error', 'absent'):
    raise common.IngestError(f"missing must be 'error' or 'absent', got {missing!r}")
  rows = _read_index(index_path, columns)
  found = sorted({r.label for r in rows if r.label})
  label_names = tuple(label_names) if label_names else tuple(found)
  if not label_names or len(set(label_names)) != len(label_names):
    raise common.IngestError(f'{index_path}: label names must be unique and non-empty, got '
                             f'{list(label_names)}')
  class_of = {name: k for k, name in enumerate(label_names)}
  tables = {m: read_features(os.fspath(p), columns.id) for m, p in features.items()}
  for table in tables.values():
    _check_layout(table, len(rows), columns, index_path)

  by_dialogue: dict[str, list[int]] = collections.defaultdict(list)
  for i, row in enumerate(rows):
    by_dialogue[row.dialogue].append(i)
  splits: dict[str, list] = collections.defaultdict(list)
  for dialogue, members in by_dialogue.items():
    where = common.dialogue_where(index_path, dialogue)
    split_of = {rows[i].split for i in members}
    if len(split_of) > 1:
      raise common.IngestError(f'{where}: {columns.split} has several values {sorted(split_of)} '
                               '(a dialogue belongs to one split)')
    members.sort(key=lambda i: rows[i].utterance)
    for a, b in zip(members, members[1:]):
      if rows[a].utterance == rows[b].utterance:
        raise common.IngestError(f'{where}: {columns.utterance} {rows[a].utterance} appears '
                                 f'twice (lines {rows[a].line} and {rows[b].line})')
    labels = []
    for i in members:
      label = rows[i].label
      if label and label not in class_of:
        raise common.IngestError(f'{where} utterance {rows[i].utterance} (line {rows[i].line}): '
                                 f'{columns.label} {label!r} is not one of {list(label_names)}')
      labels.append(class_of[label] if label else -1)
    feats, present = {}, {}
    for m, table in tables.items():
      vectors = [_feature_of(table, m, i, rows[i],
                             f'{where} utterance {rows[i].utterance} (line {rows[i].line})',
                             missing) for i in members]
      width = table.rows.shape[1]
      present[m] = np.asarray([v is not None for v in vectors])
      feats[m] = np.stack([np.zeros(width, np.float32) if v is None else v for v in vectors])
    splits[split_of.pop()].append(common.make_record(
        dialogue_id=dialogue, speakers=[rows[i].speaker for i in members], labels=labels,
        transcripts=[rows[i].text for i in members], features=feats,
        utterance_ids=[rows[i].utterance for i in members], present=present))
  for split in ('train', 'test'):
    if not splits.get(split):
      raise common.IngestError(f'{index_path}: no dialogue in the {split} split '
                               f'({columns.split} column)')
  return common.Corpus(splits=dict(splits), label_names=tuple(label_names),
                       dims={m: int(t.rows.shape[1]) for m, t in tables.items()})
