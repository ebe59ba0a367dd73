"""Dialogue CSVs (MELD `*_sent_emo.csv`, IEMOCAP's 6-class CSV, or any dialogue CSV) -> dialogues.

One row per utterance. A `CsvSchema` names the columns and the label set, so a new dataset
needs a config entry, not code. Rows are grouped by dialogue id (in order of first
appearance) and ordered by utterance id within a dialogue. A dialogue may be identified by
several columns (season, episode, scene): its id is then their values joined by '/'.
Speaker cells holding a list of names (`['Monica Geller']`) are normalised and counted. The
schema keys, with an example for a non-MELD corpus: docs/dialogue_csv.md.

Problems are never dropped silently: with `on_bad_row='error'` (default) the first bad row
stops ingestion with the file, line and column named; with 'skip' the row is left out and
counted per reason in the returned `IngestReport`, which callers print. Duplicate
(dialogue, utterance) ids and missing columns are always errors: they mean the file is not
what the schema says.
"""

from __future__ import annotations

import ast
import collections
import csv
import dataclasses
import io
import os
import re
from typing import Literal, Sequence
import warnings

import numpy as np

from mer_jax import errors
from mer_jax.data import shards

MELD_LABELS = ('neutral', 'surprise', 'fear', 'sadness', 'joy', 'disgust', 'anger')
IEMOCAP_LABELS = ('neutral', 'frustration', 'sadness', 'anger', 'excited', 'happiness')
# Joins the values of several dialogue columns into one dialogue id ('1/3/12').
DIALOGUE_ID_SEPARATOR = '/'
# Joins the names of a speaker cell that lists several speakers ("['Rachel', 'Ross']").
SPEAKER_SEPARATOR = ' & '


class CsvFormatError(errors.UserError):
  """A dialogue CSV cannot be read as its schema says."""


@dataclasses.dataclass(frozen=True)
class CsvSchema:
  """Column names and label set of a dialogue CSV."""

  label_names: tuple[str, ...]
  # One column, or several whose values together identify a dialogue.
  dialogue_column: str | tuple[str, ...] = 'Dialogue_ID'
  utterance_column: str = 'Utterance_ID'
  text_column: str = 'Utterance'
  speaker_column: str = 'Speaker'
  label_column: str = 'Emotion'
  # Label spellings mapped onto label_names (e.g. {'happy': 'happiness'}); matching is
  # case-insensitive after this mapping.
  label_aliases: tuple[tuple[str, str], ...] = ()

  @property
  def dialogue_columns(self) -> tuple[str, ...]:
    if isinstance(self.dialogue_column, str):
      return (self.dialogue_column,)
    return tuple(self.dialogue_column)

  @property
  def columns(self) -> tuple[str, ...]:
    return (*self.dialogue_columns, self.utterance_column, self.text_column,
            self.speaker_column, self.label_column)


MELD_SCHEMA = CsvSchema(label_names=MELD_LABELS)
IEMOCAP_SCHEMA = CsvSchema(label_names=IEMOCAP_LABELS,
                           label_aliases=(('neu', 'neutral'), ('fru', 'frustration'),
                                          ('sad', 'sadness'), ('ang', 'anger'),
                                          ('exc', 'excited'), ('hap', 'happiness'),
                                          ('happy', 'happiness')))


def schema_from_config(cfg, label_names: Sequence[str] = ()) -> CsvSchema:
  """A schema from a config block: `preset` ('meld', 'iemocap', 'custom') plus overrides.

  The labels are `cfg.label_names` if set, else `label_names` (the config's top-level
  `label_names`, so a user sets them once), else the preset's. A preset's aliases whose label
  is not in the label set are dropped; the user's own aliases are checked when reading.
  """
  base = {'meld': MELD_SCHEMA, 'iemocap': IEMOCAP_SCHEMA, 'custom': None}
  if cfg.preset not in base:
    raise ValueError(f'csv.preset must be one of {sorted(base)}, got {cfg.preset!r}')
  schema = base[cfg.preset]
  overrides = {}
  for key in ('dialogue_column', 'utterance_column', 'text_column', 'speaker_column',
              'label_column'):
    if cfg.get(key):
      overrides[key] = cfg[key]
  if isinstance(overrides.get('dialogue_column'), (tuple, list)):
    columns = tuple(overrides['dialogue_column'])
    overrides['dialogue_column'] = columns[0] if len(columns) == 1 else columns
  labels = tuple(cfg.get('label_names') or label_names) or (schema.label_names if schema else ())
  if not labels:
    raise ValueError('csv.preset=custom needs label_names (or csv.label_names)')
  overrides['label_names'] = labels
  if cfg.get('label_aliases'):
    overrides['label_aliases'] = tuple((str(k), str(v)) for k, v in dict(cfg.label_aliases).items())
  elif schema is not None:
    known = {name.lower() for name in labels}
    overrides['label_aliases'] = tuple((alias, target) for alias, target in schema.label_aliases
                                       if target.lower() in known)
  if schema is None:
    return CsvSchema(**overrides)
  return dataclasses.replace(schema, **overrides)


# ---------------------------------------------------------------------------
# Text repair.

# UTF-8 text that was decoded as cp1252 somewhere upstream ("itâ€™s" for "it's").
_MOJIBAKE_HINT = re.compile('[\u00c2-\u00c3\u00e2][\u0080-\u00bf\u0152-\u2122]')
# C1 control characters: cp1252 punctuation bytes (0x91 = left quote, ...) decoded as latin-1.
_C1 = re.compile('[\u0080-\u009f]')
_ASCII_PUNCTUATION = str.maketrans({
    '\u2018': "'", '\u2019': "'", '\u201a': "'", '\u201b': "'", '\u2032': "'",
    '\u201c': '"', '\u201d': '"', '\u201e': '"', '\u2033': '"',
    '\u2013': '-', '\u2014': '-', '\u2015': '-', '\u2212': '-',
    '\u2026': '...', '\u00a0': ' ',
})


def _undo_mojibake(text: str) -> str:
  try:
    return text.encode('cp1252').decode('utf-8')
  except UnicodeError:
    # Characters cp1252 cannot encode (e.g. a stray C1 byte): repair run by run.
    def fix(match: re.Match) -> str:
      try:
        return match.group(0).encode('cp1252').decode('utf-8')
      except UnicodeError:
        return match.group(0)
    return re.sub('[\u00c2-\u00c3\u00e2][\u0080-\u00bf\u0152-\u2122]{1,2}', fix, text)


def _c1_to_cp1252(match: re.Match) -> str:
  try:
    return bytes([ord(match.group(0))]).decode('cp1252')
  except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d are undefined in cp1252
    return ' '


def clean_text(text: str, *, ascii_punctuation: bool = True) -> str:
  """Repairs MELD's mis-decoded characters and normalises whitespace.

  `â€™` (UTF-8 read as cp1252) and `\\x92` (a cp1252 byte read as latin-1) both become `’`;
  with `ascii_punctuation` typographic quotes, dashes and ellipses become ASCII.
  """
  if _MOJIBAKE_HINT.search(text):
    text = _undo_mojibake(text)
  text = _C1.sub(_c1_to_cp1252, text)
  if ascii_punctuation:
    text = text.translate(_ASCII_PUNCTUATION)
  return ' '.join(text.split())


# ---------------------------------------------------------------------------
# Ingestion.


@dataclasses.dataclass
class Dialogue:
  """One dialogue in utterance order."""

  dialogue_id: str
  utterance_ids: np.ndarray  # int32[n]
  speakers: list[str]
  transcripts: list[str]
  # int32[n], -1 where the CSV has no label column value and unlabeled is allowed
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.transcripts)


@dataclasses.dataclass
class IngestReport:
  """What ingestion of one file kept and left out."""

  path: str
  rows: int = 0
  kept: int = 0
  dialogues: int = 0
  repaired_text: int = 0  # rows with mis-decoded characters that `clean_text` repaired
  listed_speakers: int = 0  # speaker cells holding a list of names, normalised
  listed_speakers_example: str = ''  # the first: 'line N: <cell> -> <speaker>'
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=dict)  # reason -> first 'line N: ...'

  def skip(self, reason: str, where: str) -> None:
    self.skipped[reason] += 1
    self.examples.setdefault(reason, where)

  def summary(self) -> str:
    text = (f'{self.path}: {self.rows} rows -> {self.kept} utterances in {self.dialogues} '
            f'dialogues')
    if self.repaired_text:
      text += f'; repaired text in {self.repaired_text} rows'
    if self.listed_speakers:
      text += (f'; normalised {self.listed_speakers} list-valued speaker cells (first: '
               f'{self.listed_speakers_example})')
    if self.skipped:
      parts = [f'{n} {reason} (first: {self.examples[reason]})'
               for reason, n in sorted(self.skipped.items())]
      text += '; skipped ' + ', '.join(parts)
    return text


def _decode(raw: bytes, path: str) -> str:
  try:
    return raw.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b'\n') + 1
    raise CsvFormatError(
        f'{path}: line {line} is not valid UTF-8 (byte {raw[e.start]:#04x} at offset '
        f'{e.start}); re-save the file as UTF-8') from None


_INTEGER = re.compile(r'[+-]?[0-9]+')
_INT32 = np.iinfo(np.int32)


def _parse_id(value: str, column: str) -> tuple[int | None, str, str]:
  """(id, '', '') or (None, skip reason, message) for an utterance id cell, stored as int32."""
  text = value.strip()
  if not _INTEGER.fullmatch(text):
    shown = value if len(value) <= 40 else value[:37] + '...'
    return None, 'non-integer utterance id', f'column {column!r} must be an integer, got {shown!r}'
  number = int(text)
  if not _INT32.min <= number <= _INT32.max:
    shown = text if len(text) <= 40 else text[:37] + '...'
    return None, 'utterance id out of range', (
        f'column {column!r}: {shown} is outside the int32 range [{_INT32.min}, {_INT32.max}]')
  return number, '', ''


_STRING_LITERAL = r"""(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")"""
# A Python or JSON list of string literals and nothing else: only such cells reach literal_eval.
_LIST_OF_STRINGS = re.compile(
    rf'\[\s*(?:{_STRING_LITERAL}(?:\s*,\s*{_STRING_LITERAL})*\s*,?\s*)?\]')


def normalise_speaker(cell: str) -> tuple[str, bool]:
  """(speaker, whether the cell was a list of names) of a speaker cell, whitespace collapsed.

  A cell that is a Python/JSON list of strings becomes its one name, or its names (empty and
  repeated ones dropped) joined by SPEAKER_SEPARATOR: "['Rachel Green', 'Ross Geller']" ->
  'Rachel Green & Ross Geller'; '[]' -> '' (an empty speaker). Other cells are kept as they are.
  """
  text = cell.strip()
  if _LIST_OF_STRINGS.fullmatch(text):
    try:
      with warnings.catch_warnings():  # "invalid escape sequence" warnings on names like '\q'
        warnings.simplefilter('ignore')
        names = ast.literal_eval(text)
    except (ValueError, SyntaxError):  # e.g. a truncated \x escape; then the cell is a name
      names = None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
      names = dict.fromkeys(' '.join(n.split()) for n in names)
      return SPEAKER_SEPARATOR.join(n for n in names if n), True
  return ' '.join(text.split()), False


def _rows(reader: csv.DictReader, path: str):
  """The reader's rows; a row the csv module cannot split is a CsvFormatError naming its line."""
  while True:
    try:
      row = next(reader)
    except StopIteration:
      return
    except csv.Error as e:  # e.g. a cell longer than csv.field_size_limit()
      # DictReader.line_num counts the rows read whole; its csv.reader's, the lines read.
      raise CsvFormatError(f'{path}: line {reader.reader.line_num}: {e}') from None
    yield row


def read_dialogue_csv(path: str | os.PathLike, schema: CsvSchema, *,
                      on_bad_row: Literal['error', 'skip'] = 'error',
                      ascii_punctuation: bool = True,
                      allow_unlabeled: bool = False) -> tuple[list[Dialogue], IngestReport]:
  """Reads one CSV into dialogues (utterance order) and a report of what was left out.

  Bad rows (unknown label, empty utterance or speaker, an utterance id that is not an integer
  or does not fit int32) raise `CsvFormatError` naming the file, line and column, or are counted
  in the report with `on_bad_row='skip'`. List-valued speaker cells are normalised
  (`normalise_speaker`) and counted in the report. With `allow_unlabeled`, an empty label cell
  gives label -1 (for prediction inputs).
  """
  path = os.fspath(path)
  if on_bad_row not in ('error', 'skip'):
    raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f'dialogue CSV not found: {path}')
  report = IngestReport(path=path)
  with open(path, 'rb') as f:
    text = _decode(f.read(), path)
  reader = csv.DictReader(io.StringIO(text, newline=''))
  header = reader.fieldnames or []
  stripped = {name.strip(): name for name in header if name is not None}
  missing = [c for c in schema.columns if c not in stripped]
  if missing:
    raise CsvFormatError(f'{path}: missing column(s) {missing}; the header has {list(stripped)}')
  col = {c: stripped[c] for c in schema.columns}
  label_index = {name.lower(): i for i, name in enumerate(schema.label_names)}
  for alias, target in schema.label_aliases:
    if target.lower() not in label_index:
      raise ValueError(f'label alias {alias!r} -> {target!r}: {target!r} is not a label')
    label_index.setdefault(alias.lower(), label_index[target.lower()])

  by_dialogue: dict[str, dict[int, tuple[str, str, int]]] = {}
  first_line: dict[tuple[str, int], int] = {}
  # Joined ids must stay distinct: ('a/b', 'c') and ('a', 'b/c') would both be 'a/b/c'.
  dialogue_first: dict[str, tuple[tuple[str, ...], int]] = {}
  dialogue_name = DIALOGUE_ID_SEPARATOR.join(schema.dialogue_columns)
  for row in _rows(reader, path):
    report.rows += 1
    line = reader.line_num
    where = f'{path}: line {line}'
    if None in row:  # more cells than header columns
      raise CsvFormatError(f'{where}: {len(header) + len(row[None])} cells for {len(header)} '
                           'columns (an unquoted comma?)')
    values = {c: row[col[c]] for c in schema.columns}
    if any(v is None for v in values.values()):
      raise CsvFormatError(f'{where}: too few cells for the header ({len(header)} columns)')

    def bad(reason: str, detail: str) -> None:
      if on_bad_row == 'error':
        raise CsvFormatError(f'{where}: {detail}')
      report.skip(reason, f'line {line}: {detail}')

    parts = tuple(values[c].strip() for c in schema.dialogue_columns)
    if not all(parts):
      bad('empty dialogue id', f'empty {schema.dialogue_columns[parts.index("")]!r}')
      continue
    dialogue = DIALOGUE_ID_SEPARATOR.join(parts)
    first_parts, first_on = dialogue_first.setdefault(dialogue, (parts, line))
    if first_parts != parts:
      raise CsvFormatError(f'{where}: dialogue id {dialogue!r} also comes from {first_parts} '
                           f'on line {first_on}: a value of {dialogue_name} contains '
                           f'{DIALOGUE_ID_SEPARATOR!r}')
    utterance, reason, detail = _parse_id(values[schema.utterance_column],
                                          schema.utterance_column)
    if utterance is None:
      bad(reason, detail)
      continue
    raw_label = values[schema.label_column].strip()
    if not raw_label and allow_unlabeled:
      label = -1
    elif raw_label.lower() in label_index:
      label = label_index[raw_label.lower()]
    else:
      bad('unknown label', f'unknown label {raw_label!r} in column {schema.label_column!r} '
          f'(labels: {list(schema.label_names)})')
      continue
    raw_text = values[schema.text_column]
    if _MOJIBAKE_HINT.search(raw_text) or _C1.search(raw_text):
      report.repaired_text += 1
    transcript = clean_text(raw_text, ascii_punctuation=ascii_punctuation)
    if not transcript:
      bad('empty utterance', f'empty {schema.text_column!r}')
      continue
    speaker, listed = normalise_speaker(values[schema.speaker_column])
    if not speaker:
      bad('empty speaker', f'empty {schema.speaker_column!r}')
      continue
    if listed:
      report.listed_speakers += 1
      if not report.listed_speakers_example:
        report.listed_speakers_example = (f'line {line}: {values[schema.speaker_column].strip()}'
                                          f' -> {speaker!r}')
    key = (dialogue, utterance)
    if key in first_line:
      raise CsvFormatError(f'{where}: duplicate utterance {dialogue_name}={dialogue} '
                           f'{schema.utterance_column}={utterance} (first on line '
                           f'{first_line[key]})')
    first_line[key] = line
    by_dialogue.setdefault(dialogue, {})[utterance] = (speaker, transcript, label)

  dialogues = []
  for dialogue, utterances in by_dialogue.items():
    order = sorted(utterances)
    speakers, transcripts, labels = zip(*(utterances[u] for u in order))
    dialogues.append(Dialogue(dialogue_id=dialogue,
                              utterance_ids=np.asarray(order, np.int32),
                              speakers=list(speakers), transcripts=list(transcripts),
                              labels=np.asarray(labels, np.int32)))
  report.kept = sum(len(d) for d in dialogues)
  report.dialogues = len(dialogues)
  if not dialogues:
    raise CsvFormatError(f'{path}: no usable rows ({report.summary()})')
  return dialogues, report


def to_record(dialogue: Dialogue, features: dict[str, np.ndarray],
              present: dict[str, np.ndarray]) -> shards.DialogueRecord:
  """A shard record of `dialogue` with the given per-modality features."""
  return shards.DialogueRecord(
      dialogue_id=dialogue.dialogue_id, utterance_ids=dialogue.utterance_ids,
      speakers=list(dialogue.speakers), speaker_ids=shards.speaker_ranks(dialogue.speakers),
      labels=dialogue.labels, transcripts=list(dialogue.transcripts), features=features,
      present=present)


def split_paths(csv_dir: str, pattern: str, splits: Sequence[str]) -> dict[str, str]:
  """`{split: csv_dir/pattern.format(split=split)}`, checking every file exists."""
  paths = {s: os.path.join(csv_dir, pattern.format(split=s)) for s in splits}
  missing = [p for p in paths.values() if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'dialogue CSV(s) not found: {missing} (csv.dir={csv_dir!r}, '
                            f'csv.pattern={pattern!r})')
  return paths
