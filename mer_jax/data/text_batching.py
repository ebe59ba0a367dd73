"""Length-bucketed token batches with static shapes.

Each sequence goes to the smallest bucket length that holds it; a bucket's batches have a
fixed shape [rows, length] with rows = tokens_per_batch // length (rounded down to a multiple
of `row_multiple`, for data-parallel meshes), so a jitted encoder compiles once per bucket and
short utterances are not padded to the longest prompt. The last batch of a bucket has a power
of two of rows, filled with padding rows (index -1, label -1, one pad token) that the loss and
the feature writer ignore.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from mer_jax.data import prompts as prompts_lib


def bucket_lengths(max_length: int, smallest: int = 16, growth: float = 2.0,
                   multiple: int = 8) -> tuple[int, ...]:
  """Lengths from `smallest` growing by `growth` (rounded up to `multiple`), then `max_length`.

  A smaller growth means less padding and more shapes to compile (one per bucket).
  """
  if max_length < 1 or smallest < 1 or growth <= 1.0 or multiple < 1:
    raise ValueError(f'need max_length, smallest, multiple >= 1 and growth > 1, got '
                     f'{max_length}, {smallest}, {multiple}, {growth}')
  lengths = []
  length = smallest
  while length < max_length:
    lengths.append(length)
    length = max(length + 1, int(np.ceil(length * growth / multiple)) * multiple)
  return (*lengths, max_length)


@dataclasses.dataclass(frozen=True)
class TokenBatch:
  """A padded batch of token sequences (right padding)."""

  input_ids: np.ndarray  # int32[B, L]
  attention_mask: np.ndarray  # int32[B, L]
  last_index: np.ndarray  # int32[B], position of each row's last real token
  target_mask: np.ndarray  # bool[B, L], the target utterance's tokens
  labels: np.ndarray  # int32[B], -1 for padding rows
  index: np.ndarray  # int32[B], position of the row's sequence in the input list; -1 = padding

  @property
  def num_real(self) -> int:
    return int(np.sum(self.index >= 0))

  @property
  def num_real_tokens(self) -> int:
    return int(np.sum(self.attention_mask[self.index >= 0]))


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """Which sequences go into which batch, and each batch's padded length."""

  batches: tuple[tuple[int, np.ndarray], ...]  # (length, int32[rows] indices, -1 = padding)

  def __len__(self) -> int:
    return len(self.batches)

  def padding_fraction(self, lengths: Sequence[int]) -> float:
    """Share of the token slots (padding rows included) that hold no real token."""
    lengths = np.asarray(lengths)
    slots = sum(length * len(rows) for length, rows in self.batches)
    real = sum(int(lengths[rows[rows >= 0]].sum()) for _, rows in self.batches)
    return 1.0 - real / max(slots, 1)


def rows_for(length: int, tokens_per_batch: int, row_multiple: int) -> int:
  rows = max(1, tokens_per_batch // length)
  return max(row_multiple, rows // row_multiple * row_multiple)


def _pow2_rows(n: int, row_multiple: int) -> int:
  rows = 1 << max(n - 1, 0).bit_length()
  return -(-rows // row_multiple) * row_multiple


def plan_batches(lengths: Sequence[int], buckets: Sequence[int], tokens_per_batch: int, *,
                 row_multiple: int = 1, rng: np.random.Generator | None = None) -> BatchPlan:
  """Groups sequences by bucket; with `rng`, shuffles within buckets and the batch order."""
  lengths = np.asarray(lengths, np.int64)
  buckets = sorted(int(b) for b in buckets)
  if len(lengths) and lengths.max() > buckets[-1]:
    worst = int(np.argmax(lengths))
    raise ValueError(f'sequence {worst} has {lengths[worst]} tokens, more than the largest '
                     f'bucket ({buckets[-1]})')
  which = np.searchsorted(np.asarray(buckets), lengths, side='left')
  batches = []
  for b, length in enumerate(buckets):
    members = np.flatnonzero(which == b).astype(np.int32)
    if rng is not None:
      members = rng.permutation(members)
    rows = rows_for(length, tokens_per_batch, row_multiple)
    for start in range(0, len(members), rows):
      chunk = members[start:start + rows]
      # A bucket's last batch is cut to a power of two of rows (one more shape to compile
      # rather than a batch of mostly padding rows).
      size = min(rows, _pow2_rows(len(chunk), row_multiple))
      chunk = np.concatenate([chunk, np.full(size - len(chunk), -1, np.int32)])
      batches.append((length, chunk))
  if rng is not None:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return BatchPlan(tuple(batches))


def make_batch(sequences: Sequence[prompts_lib.Prompt], rows: np.ndarray, length: int,
               pad_id: int, labels: Sequence[int] | None = None) -> TokenBatch:
  """Pads the sequences `rows` (-1 = padding row) to [len(rows), length]."""
  n = len(rows)
  ids = np.full((n, length), pad_id, np.int32)
  mask = np.zeros((n, length), np.int32)
  target = np.zeros((n, length), bool)
  last = np.zeros(n, np.int32)
  out_labels = np.full(n, -1, np.int32)
  for r, i in enumerate(rows):
    if i < 0:
      mask[r, 0] = 1  # one attended token keeps the padding row's softmax finite
      continue
    seq = sequences[i]
    ids[r, :len(seq)] = seq.ids
    mask[r, :len(seq)] = 1
    target[r, seq.target_start:seq.target_end] = True
    last[r] = len(seq) - 1
    if labels is not None:
      out_labels[r] = labels[i]
  return TokenBatch(ids, mask, last, target, out_labels, np.asarray(rows, np.int32))


def iterate_batches(sequences: Sequence[prompts_lib.Prompt], plan: BatchPlan, pad_id: int,
                    labels: Sequence[int] | None = None) -> Iterator[TokenBatch]:
  for length, rows in plan.batches:
    yield make_batch(sequences, rows, length, pad_id, labels)
