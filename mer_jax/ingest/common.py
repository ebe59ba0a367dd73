"""What the ingest formats share: their error, the corpus they build, checked conversions of one
field of one dialogue (each error names the file, dialogue and field), the dev carve-out and the
write."""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from etils import epath

from mer_jax import errors
from mer_jax.data import shards

SPLITS = ('train', 'dev', 'test')
DevPick = Literal['random', 'head']


class IngestError(errors.UserError):
  """A source file has the wrong structure; the message names the file, dialogue and field."""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Dialogues read from a source, checked, ready to write."""

  splits: dict[str, list[shards.DialogueRecord]]  # 'train', 'test' and maybe 'dev'
  label_names: tuple[str, ...]
  dims: dict[str, int]  # modality ('t', 'a', 'v') -> feature width


@dataclasses.dataclass(frozen=True)
class DevCarveOut:
  """How to take a dev split from train where the source has none (by whole dialogues).

  'random' takes round(fraction * n) of the n train dialogues chosen by a permutation seeded with
  `seed`; 'head' takes the first int(fraction * n) in the source's order, as the MMGCN lineage's
  loaders do (their validation sampler takes the first 10% of trainVid).
  """

  fraction: float = 0.1
  seed: int = 0
  pick: DevPick = 'random'


def dialogue_where(path: str, dialogue_id: Any) -> str:
  return f'{path}: dialogue {dialogue_id!r}'


class Widths:
  """The feature width of each field, which every dialogue must share."""

  def __init__(self):
    self._seen: dict[str, tuple[int, str]] = {}

  def check(self, field: str, width: int, where: str) -> None:
    first = self._seen.setdefault(field, (width, where))
    if first[0] != width:
      raise IngestError(f'{where}: {field} has {width} features per utterance, {first[1]} has '
                        f'{first[0]}')

  def __getitem__(self, field: str) -> int:
    return self._seen[field][0]


def feature_rows(value: Any, where: str, field: str, num_utterances: int) -> np.ndarray:
  """A dialogue's features (a 2-D array, or one vector per utterance) as float32[n, d]."""
  if isinstance(value, np.ndarray) and value.ndim == 2:
    rows = value
  elif isinstance(value, (list, tuple, np.ndarray)):
    vectors = [np.asarray(v) for v in value]
    for i, v in enumerate(vectors):
      if v.ndim != 1 or v.dtype.kind not in 'biuf':
        raise IngestError(f'{where}: {field} utterance {i} is not a vector of numbers '
                          f'({v.dtype.name}{list(v.shape)})')
    widths = {len(v) for v in vectors}
    if len(widths) > 1:
      raise IngestError(f'{where}: {field} rows have different widths {sorted(widths)}')
    rows = np.stack(vectors) if vectors else np.zeros((0, 0))
  else:
    raise IngestError(f'{where}: {field} is a {type(value).__name__}, expected one feature vector '
                      'per utterance')
  if rows.dtype.kind not in 'biuf':
    raise IngestError(f'{where}: {field} holds {rows.dtype.name}, expected numbers')
  if len(rows) != num_utterances:
    raise IngestError(f'{where}: {field} has {len(rows)} rows for {num_utterances} utterances')
  rows = rows.astype(np.float32)
  bad = ~np.isfinite(rows)
  if bad.any():
    raise IngestError(f'{where}: {field} utterance {int(np.argwhere(bad)[0, 0])} has NaN or Inf')
  return rows


def label_index(value: Any, where: str, field: str, label_names: Sequence[str]) -> int:
  """A class index in [0, len(label_names))."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    index = int(value)
  elif isinstance(value, numbers.Real) and float(value).is_integer():
    index = int(value)
  else:
    raise IngestError(f'{where}: {field} {value!r} is not a class index')
  if not 0 <= index < len(label_names):
    raise IngestError(f'{where}: {field} {index} is not a class index 0..{len(label_names) - 1} '
                      f'({", ".join(label_names)})')
  return index


def text_of(value: Any, where: str, field: str) -> str:
  """A string read from a pickle, with UTF-8 that latin-1 decoding garbled put right."""
  if isinstance(value, bytes):
    value = value.decode('latin1')
  if not isinstance(value, str):
    raise IngestError(f'{where}: {field} is a {type(value).__name__}, expected a string')
  if value.isascii():
    return value
  try:  # A Python 2 pickle's UTF-8 bytes arrive as latin-1 characters ("Ã©" for "é").
    return value.encode('latin1').decode('utf-8')
  except UnicodeError:
    return value


def speaker_of(value: Any, where: str, field: str) -> str:
  """A speaker name, or `speaker{k}` for a one-hot vector with its 1 at k."""
  if isinstance(value, (str, bytes)):
    name = text_of(value, where, field).strip()
    if not name:
      raise IngestError(f'{where}: {field} is empty')
    return name
  vector = np.asarray(value)
  if (vector.ndim != 1 or vector.dtype.kind not in 'biuf' or np.sum(vector != 0) != 1
      or vector.max() != 1):
    raise IngestError(f'{where}: {field} {np.asarray(value).tolist()!r} is neither a name nor a '
                      'one-hot vector')
  return f'speaker{int(np.argmax(vector))}'


def as_sequence(value: Any, where: str, field: str) -> list[Any]:
  if isinstance(value, np.ndarray):
    return list(value)
  if not isinstance(value, (list, tuple)):
    raise IngestError(f'{where}: {field} is a {type(value).__name__}, expected a list')
  return list(value)


def make_record(dialogue_id: str, speakers: Sequence[str], labels: Sequence[int],
                transcripts: Sequence[str], features: Mapping[str, np.ndarray],
                utterance_ids: Sequence[int] | None = None,
                present: Mapping[str, np.ndarray] | None = None) -> shards.DialogueRecord:
  n = len(labels)
  return shards.DialogueRecord(
      dialogue_id=dialogue_id,
      utterance_ids=np.asarray(range(n) if utterance_ids is None else utterance_ids, np.int32),
      speakers=list(speakers),
      speaker_ids=shards.speaker_ranks(speakers),
      labels=np.asarray(labels, np.int32).reshape(n),
      transcripts=list(transcripts),
      features=dict(features),
      present=dict(present) if present else {m: np.ones(n, bool) for m in features})


def check_disjoint(splits: Mapping[str, Sequence[Any]], path: str) -> None:
  """Every dialogue id in at most one split, once."""
  seen: dict[Any, str] = {}
  for split, ids in splits.items():
    for dialogue_id in ids:
      if dialogue_id in seen:
        again = 'twice' if seen[dialogue_id] == split else f'and in {seen[dialogue_id]!r}'
        raise IngestError(f'{dialogue_where(path, dialogue_id)}: listed in split {split!r} {again}')
      seen[dialogue_id] = split


def carve_dev(train: Sequence[shards.DialogueRecord], how: DevCarveOut
              ) -> tuple[list[shards.DialogueRecord], list[shards.DialogueRecord]]:
  """(train, dev): whole dialogues of `train` moved to dev as `how` says, order kept."""
  n = len(train)
  if not 0.0 < how.fraction < 1.0:
    raise IngestError(f'dev_fraction must be in (0, 1), got {how.fraction}')
  if how.pick not in ('random', 'head'):
    raise IngestError(f"dev_pick must be 'random' or 'head', got {how.pick!r}")
  if n < 2:
    raise IngestError(f'the train split has {n} dialogue(s): too few to carve a dev split from')
  if how.pick == 'head':
    take = set(range(min(max(1, int(how.fraction * n)), n - 1)))
  else:
    count = min(max(1, round(how.fraction * n)), n - 1)
    take = set(np.random.default_rng(how.seed).permutation(n)[:count].tolist())
  return ([r for i, r in enumerate(train) if i not in take],
          [r for i, r in enumerate(train) if i in take])


def with_dev(corpus: Corpus, how: DevCarveOut) -> Corpus:
  """`corpus` with a dev split carved from train where it has none."""
  if 'dev' in corpus.splits:
    return corpus
  train, dev = carve_dev(corpus.splits['train'], how)
  splits = {'train': train, 'dev': dev, 'test': corpus.splits['test']}
  return dataclasses.replace(corpus, splits=splits)


def check_out_dir(out_dir: str | os.PathLike[str], overwrite: bool) -> None:
  """Refuses, before any input is read, an output folder that holds something."""
  out = epath.Path(out_dir)
  if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
    raise IngestError(f'{out}: already exists and is not empty (pass overwrite=True, or '
                      '--overwrite, to replace it)')


def write(corpus: Corpus, out_dir: str | os.PathLike[str], *, num_shards: int = 1,
          overwrite: bool = False) -> shards.Manifest:
  """Writes `corpus` as a shard folder (train, dev, test); nothing appears at `out_dir` unless
  every record passes validation."""
  for split in SPLITS:
    if not corpus.splits.get(split):
      raise IngestError(f'the {split} split has no dialogues')
  return shards.write_shards(out_dir, {s: corpus.splits[s] for s in SPLITS},
                             label_names=corpus.label_names, dims=corpus.dims,
                             num_shards=num_shards, overwrite=overwrite)
