"""Grain input pipeline: dialogue records -> padded `jraph.GraphsTuple` batches of static shape.

Every batch has the same node, edge and graph budgets, so a step compiles once. Two packings:

* graph scope 'dialogue' (ours): whole dialogues, in a per-epoch seeded order, packed greedily
  into the node/graph budget; each dialogue is one graph.
* graph scope 'batch' (the authors'): utterances shuffled across dialogues, `utterances_per_batch`
  per batch, the whole batch forming one graph (so "temporal" edges join batch neighbours).

The plan of an epoch (which records go into which batch) is a pure function of (lengths, seed,
epoch), so a Grain iterator over it is checkpointable by its position alone.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from typing import Any, Mapping, Sequence

import grain
import jax
import jraph
import numpy as np

from mer_jax.batch_contract import Budget
from mer_jax.batch_contract import PADDING_EDGE
from mer_jax.batch_contract import SPEAKER_EDGE
from mer_jax.batch_contract import TEMPORAL_EDGE
from mer_jax.data.shards import DialogueRecord

@functools.cache
def _normal_quantiles() -> np.ndarray:
  """The N(0, 1) quantiles at the midpoints of 65,536 equal-probability bins, float32."""
  dist = statistics.NormalDist()
  return np.asarray([dist.inv_cdf((i + 0.5) / 65536) for i in range(65536)], np.float32)


def gaussian_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Standard normal noise, float32, as quantiles looked up by 16 random bits.

  numpy's float32 `standard_normal` was most of a student batch's host time (measurements in
  docs/performance.md). The values are N(0, 1)
  quantised to 65,536 equally likely levels, so the tails stop at +-4.3 sd (probability 2e-5
  beyond): no difference an augmentation can feel.
  """
  n = int(np.prod(shape))
  bitgen = rng.bit_generator
  if n % 4 == 0 and isinstance(bitgen, np.random.PCG64) and not bitgen.state['has_uint32']:
    # The bits rng.bytes(2 * n) would give (its 32-bit halves of 64-bit outputs, low half first),
    # in a third of the time. Not when a 32-bit half is left over from an earlier draw, which
    # rng.bytes would use first.
    bits = bitgen.random_raw(n // 4).view(np.uint16)
  else:
    bits = np.frombuffer(rng.bytes(2 * n), np.uint16)
  return np.take(_normal_quantiles(), bits).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The authors' per-utterance training augmentation (numbers from the config)."""
  t_dropout: float
  t_noise_std: float
  t_shuffle_prob: float
  t_shuffle_fraction: float
  t_scale_prob: float
  t_scale_range: tuple[float, float]
  a_noise_std: float
  v_scale_range: tuple[float, float]

  @classmethod
  def from_config(cls, cfg) -> 'Augmentation':
    return cls(t_dropout=cfg.t_dropout, t_noise_std=cfg.t_noise_std,
               t_shuffle_prob=cfg.t_shuffle_prob, t_shuffle_fraction=cfg.t_shuffle_fraction,
               t_scale_prob=cfg.t_scale_prob, t_scale_range=tuple(cfg.t_scale_range),
               a_noise_std=cfg.a_noise_std, v_scale_range=tuple(cfg.v_scale_range))

  def apply(self, features: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray],
            rngs: Mapping[str, np.random.Generator]) -> dict[str, np.ndarray]:
    """Augments [n, d] feature matrices; each utterance draws its own randomness.

    Each modality draws from its own generator (`modality_rngs`), so a modality's augmentation
    does not depend on which other modalities are loaded: the text teacher sees the same
    batches in a text-only run and in a three-modality run.
    """
    out = {}
    for m, x in features.items():
      rng = rngs[m]
      n, d = x.shape
      # Dense draws in float32: half the bits of float64 draws, the numpy cost that dominates
      # this pipeline.
      if m == 't':
        keep = rng.random((n, d), dtype=np.float32) >= self.t_dropout
        noise = gaussian_noise(rng, (n, d))
        noise *= np.float32(self.t_noise_std)
        x = np.where(keep, x.astype(np.float32, copy=False), np.float32(0.0))
        x += noise
        rows = np.flatnonzero(rng.random(n) < self.t_shuffle_prob)
        k = int(self.t_shuffle_fraction * d)
        if len(rows) and k > 1:
          # Per chosen row: k distinct dimensions, their values permuted among themselves.
          chosen = rng.permuted(np.broadcast_to(np.arange(d), (len(rows), d)), axis=1)[:, :k]
          moved = rng.permuted(chosen, axis=1)
          x[rows[:, None], chosen] = x[rows[:, None], moved]
        scale = np.where(rng.random(n) < self.t_scale_prob,
                         rng.uniform(*self.t_scale_range, size=n), 1.0)
        x *= scale[:, None].astype(np.float32)
      elif m == 'a':
        noise = gaussian_noise(rng, (n, d))
        noise *= np.float32(self.a_noise_std)
        noise += x
        x = noise
      elif m == 'v':
        scale = rng.uniform(*self.v_scale_range, size=(n, 1)).astype(np.float32)
        x = x.astype(np.float32, copy=False) * scale
      else:
        x = x.astype(np.float32, copy=True)
      x[~present[m]] = 0.0
      out[m] = x
    return out


_STREAM_OF_MODALITY = {'t': 0, 'a': 1, 'v': 2}


def modality_rngs(base: int, group: int,
                  modalities: Sequence[str] = tuple(_STREAM_OF_MODALITY)
                  ) -> dict[str, np.random.Generator]:
  """One generator per modality (and batch group), fixed whatever else is loaded or drawn."""
  return {m: np.random.default_rng([base, group, _STREAM_OF_MODALITY[m]]) for m in modalities}


# ------------------------------------------------------------------------------------------
# Batch plans: which (record, utterance) goes where. Pure functions of their inputs.
# ------------------------------------------------------------------------------------------

def epoch_order(num_items: int, seed: int | None, epoch: int) -> np.ndarray:
  if seed is None:
    return np.arange(num_items)
  return np.random.default_rng([seed, epoch]).permutation(num_items)


def plan_dialogue_batches(lengths: np.ndarray, budget: Budget, order: np.ndarray) -> list[np.ndarray]:
  """Greedy packing of whole dialogues, in `order`, into the node and graph budget."""
  max_real_nodes, max_real_graphs = budget.max_nodes - 1, budget.max_graphs - 1
  batches, current, used = [], [], 0
  for r in order:
    n = int(lengths[r])
    if n > max_real_nodes:
      raise ValueError(
          f'dialogue record {r} has {n} utterances; batch.max_nodes={budget.max_nodes} fits at most '
          f'{max_real_nodes} (one slot is padding). Raise --config.batch.max_nodes.')
    if current and (used + n > max_real_nodes or len(current) == max_real_graphs):
      batches.append(np.asarray(current, np.int64))
      current, used = [], 0
    current.append(int(r))
    used += n
  if current:
    batches.append(np.asarray(current, np.int64))
  return batches


def group_plan(plan: Sequence[np.ndarray], budget: Budget) -> list[tuple[np.ndarray, ...]]:
  """Consecutive sub-batches of `plan` form one step: step s takes plan[s * groups + g] for group
  g, and an empty entry where the plan has run out. Returns this process's entries per step.

  Every process computes the same plan from the records' lengths (no record is read for it), so
  all of them agree on the number of steps and on which group holds which dialogues.
  """
  g = budget.groups
  empty = np.zeros((0,) + np.shape(plan[0])[1:], np.int64) if plan else np.zeros(0, np.int64)
  return [tuple(plan[s * g + k] if s * g + k < len(plan) else empty for k in budget.local_groups)
          for s in range(-(-len(plan) // g))]


def plan_utterance_batches(lengths: np.ndarray, per_batch: int, seed: int | None,
                           epoch: int) -> list[np.ndarray]:
  """The authors' batches: utterances (record, index) shuffled across dialogues, `per_batch` each."""
  pairs = np.array([(r, u) for r, n in enumerate(lengths) for u in range(int(n))], np.int64)
  pairs = pairs[epoch_order(len(pairs), seed, epoch)]
  return [pairs[i:i + per_batch] for i in range(0, len(pairs), per_batch)]


# ------------------------------------------------------------------------------------------
# Collation: a list of (record index, record) dialogues -> one padded GraphsTuple.
# ------------------------------------------------------------------------------------------

def _structural_edges(speakers_per_graph: Sequence[np.ndarray], offsets: Sequence[int],
                      speaker_edges: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  if not len(speakers_per_graph):
    return tuple(np.zeros(0, np.int32) for _ in range(4))
  senders, receivers, kinds, n_edge = [], [], [], []
  for spk, off in zip(speakers_per_graph, offsets):
    n = len(spk)
    idx = np.arange(n - 1) + off
    s = [idx, idx + 1]
    r = [idx + 1, idx]
    k = [np.full(2 * (n - 1), TEMPORAL_EDGE)]
    if speaker_edges:
      prev = _previous_same_speaker(spk)
      has = np.flatnonzero(prev >= 0)
      s += [prev[has] + off, has + off]
      r += [has + off, prev[has] + off]
      k.append(np.full(2 * len(has), SPEAKER_EDGE))
    senders.append(np.concatenate(s))
    receivers.append(np.concatenate(r))
    kinds.append(np.concatenate(k))
    n_edge.append(len(kinds[-1]))
  return (np.concatenate(senders).astype(np.int32), np.concatenate(receivers).astype(np.int32),
          np.concatenate(kinds).astype(np.int32), np.asarray(n_edge, np.int32))


def _previous_same_speaker(speakers: np.ndarray) -> np.ndarray:
  prev = np.full(len(speakers), -1, np.int64)
  last: dict[int, int] = {}
  for i, s in enumerate(speakers.tolist()):
    prev[i] = last.get(s, -1)
    last[s] = i
  return prev


def collate_graphs(graphs: Sequence[dict[str, Any]], budget: Budget, modalities: Sequence[str],
                   dims: Mapping[str, int], speaker_edges: bool,
                   teacher_classes: int = 0) -> jraph.GraphsTuple:
  """Packs graphs (dicts of per-node arrays) into one padded GraphsTuple of static shape.

  Each graph dict has 'features', 'present' (per modality), 'label', 'speaker', 'position',
  'record' (int, -1 if mixed) and 'utterance' (utterance ids, for reports); with
  `teacher_classes`, also 'teacher_log_probs' [n, teacher_classes] and 'teacher_mask'. Padding follows
  `jraph.pad_with_graphs`: labels -1, masks False, and every padding node and edge in the first
  padding graph, each padding edge joining the first padding node to itself. No graphs (a group
  with nothing left to read this step) gives a batch of padding only.
  """
  n_node = np.asarray([len(g['label']) for g in graphs], np.int32)
  total = int(n_node.sum())
  if total > budget.max_nodes - 1 or len(graphs) > budget.max_graphs - 1:
    raise ValueError(f'batch of {len(graphs)} graphs / {total} nodes exceeds the budget {budget}')
  offsets = np.concatenate([[0], np.cumsum(n_node)[:-1]]).astype(int)
  senders, receivers, kinds, n_edge = _structural_edges(
      [g['speaker'] for g in graphs], offsets, speaker_edges)

  def nodes_of(get, fill, dtype, width=None):
    return _padded([get(g) for g in graphs], budget.max_nodes, fill, dtype, width)

  nodes = {
      'features': {m: nodes_of(lambda g: g['features'][m], 0.0, np.float32, dims[m])
                   for m in modalities},
      'present': {m: nodes_of(lambda g: g['present'][m], False, bool) for m in modalities},
      'label': nodes_of(lambda g: g['label'], -1, np.int32),
      'speaker': nodes_of(lambda g: g['speaker'], 0, np.int32),
      'position': nodes_of(lambda g: g['position'], 0, np.int32),
      'mask': _padded([np.ones(total, bool)], budget.max_nodes, False, bool),
      'utterance': nodes_of(lambda g: g['utterance'], -1, np.int32),
      'record': nodes_of(lambda g: g['node_record'], -1, np.int32),
  }
  if teacher_classes:
    nodes['teacher_log_probs'] = nodes_of(lambda g: g['teacher_log_probs'], 0.0, np.float32,
                                          teacher_classes)
    nodes['teacher_mask'] = nodes_of(lambda g: g['teacher_mask'], False, bool)
  pn, pe = budget.max_nodes - total, budget.max_edges - len(senders)
  pg = budget.max_graphs - len(graphs)
  return jraph.GraphsTuple(
      nodes=nodes, edges={'kind': _padded([kinds], budget.max_edges, PADDING_EDGE, np.int32)},
      senders=_padded([senders], budget.max_edges, total, np.int32),
      receivers=_padded([receivers], budget.max_edges, total, np.int32),
      n_node=np.concatenate([n_node, [pn], np.zeros(pg - 1, np.int32)]).astype(np.int32),
      n_edge=np.concatenate([n_edge, [pe], np.zeros(pg - 1, np.int32)]).astype(np.int32),
      globals={'record': _padded([np.asarray([g['record'] for g in graphs], np.int32)],
                                 budget.max_graphs, -1, np.int32)})


def _padded(parts: Sequence[np.ndarray], rows: int, fill, dtype, width: int | None = None
            ) -> np.ndarray:
  """`parts` end to end, then `fill` up to `rows` rows: one allocation, each part copied once
  (a batch's host time is mostly such small copies)."""
  out = np.empty((rows,) if width is None else (rows, width), dtype)
  total = sum(len(p) for p in parts)
  if total:
    np.concatenate(parts, out=out[:total], casting='same_kind')
  out[total:] = fill
  return out


def concat_groups(parts: Sequence[jraph.GraphsTuple], budget: Budget) -> jraph.GraphsTuple:
  """This process's sub-batches (one per local group) end to end; edge endpoints become rows of
  the global batch, where group g starts at node row g * max_nodes."""
  if budget.groups == 1:
    return parts[0]
  shifted = [p._replace(senders=p.senders + g * budget.max_nodes,
                        receivers=p.receivers + g * budget.max_nodes)
             for g, p in zip(budget.local_groups, parts)]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *shifted)


def dialogue_graph(record: DialogueRecord, index: int, features: Mapping[str, np.ndarray],
                   modalities: Sequence[str], dims: Mapping[str, int],
                   sel: slice | np.ndarray) -> dict[str, Any]:
  """Per-node arrays of the utterances `sel` of one dialogue (a slice: read as stored, without a
  copy; collation copies them into the batch); `features` are already [len(sel), d]."""
  positions = np.arange(len(record.labels), dtype=np.int32)[sel]
  feats, present = {}, {}
  for m in modalities:
    if m in features:
      feats[m] = features[m]
      present[m] = record.present[m][sel]
    else:
      feats[m] = np.zeros((len(positions), dims[m]), np.float32)
      present[m] = np.zeros(len(positions), bool)
  return {'features': feats, 'present': present, 'label': record.labels[sel],
          'speaker': record.speaker_ids[sel], 'position': positions,
          'utterance': record.utterance_ids[sel], 'record': index,
          'node_record': np.full(len(positions), index, np.int32)}


@dataclasses.dataclass
class BatchLoader:
  """Grain transform: a plan entry (record indices, or (record, utterance) pairs) -> batch."""
  source: Any
  budget: Budget
  modalities: tuple[str, ...]
  dims: Mapping[str, int]
  speaker_edges: bool
  scope: str
  augmentation: Augmentation | None
  augmented: tuple[str, ...]  # the loaded modalities that training augments
  # Per record, the frozen teacher's [n, C] log-probabilities (a distilling student's targets,
  # computed once), with 'teacher_mask' marking where the teacher read text; None: no targets.
  teacher_log_probs: Sequence[np.ndarray] | None = None
  teacher_classes: int = 0  # the targets' width (0: no targets)

  def __call__(self, step_entry: tuple[np.ndarray, ...], rng: np.random.Generator | None = None):
    """One step: this process's sub-batches (see `group_plan`), each collated on its own, with
    augmentation streams per group and modality (independent of what else this process builds
    or loads)."""
    base = None if rng is None else int(rng.integers(2**62))
    return concat_groups(
        [self._collate(e, None if base is None else modality_rngs(base, g, self.augmented))
         for e, g in zip(step_entry, self.budget.local_groups)], self.budget)

  def _collate(self, plan_entry: np.ndarray, rngs) -> jraph.GraphsTuple:
    if self.scope == 'dialogue':
      graphs = [self._graph(r, None, rngs) for r in plan_entry.tolist()]
    elif len(plan_entry):
      graphs = [_merge_as_one_graph([self._graph(r, u, rngs) for r, u in plan_entry.tolist()],
                                    self.modalities)]
    else:
      graphs = []
    return collate_graphs(graphs, self.budget, self.modalities, self.dims, self.speaker_edges,
                          self.teacher_classes)

  def _graph(self, index: int, utterance: int | None, rngs) -> dict[str, Any]:
    record = self.source[index]
    sel = slice(None) if utterance is None else np.asarray([utterance])
    feats = {m: record.features[m][sel] for m in self.modalities if m in record.features}
    if self.augmentation is not None and rngs is not None:
      chosen = {m: x for m, x in feats.items() if m in self.augmented}
      present = {m: record.present[m][sel] for m in chosen}
      feats = {**feats, **self.augmentation.apply(chosen, present, rngs)}
    graph = dialogue_graph(record, index, feats, self.modalities, self.dims, sel)
    if self.teacher_log_probs is not None:
      graph['teacher_log_probs'] = self.teacher_log_probs[index][sel]
      graph['teacher_mask'] = record.present['t'][sel]
    return graph


def _merge_as_one_graph(parts: Sequence[dict[str, Any]], modalities) -> dict[str, Any]:
  """Utterances from different dialogues as one graph (the authors' batch-scope graph)."""
  merged = {
      'features': {m: np.concatenate([p['features'][m] for p in parts]) for m in modalities},
      'present': {m: np.concatenate([p['present'][m] for p in parts]) for m in modalities},
      'record': -1,
  }
  for key in ('label', 'speaker', 'position', 'utterance', 'node_record', 'teacher_log_probs',
              'teacher_mask'):
    if key in parts[0]:
      merged[key] = np.concatenate([p[key] for p in parts])
  # Speakers of different dialogues are different people: keep same-speaker edges within a
  # dialogue by making ranks unique per record.
  merged['speaker'] = merged['speaker'] + 1000 * merged['node_record']
  return merged


def make_dataset(source, *, config, budget: Budget, train: bool, epoch: int, seed: int,
                 modalities: Sequence[str] | None = None, dims: Mapping[str, int] | None = None,
                 augmented: Sequence[str] | None = None,
                 teacher_log_probs: Sequence[np.ndarray] | None = None) -> grain.MapDataset:
  """The batches of one epoch as a Grain MapDataset (augmented and shuffled when training).

  `modalities` and `dims`: the features the batches carry and their widths (default:
  config.data's). `augmented`: the modalities that training augments (default: every loaded one);
  the others arrive as stored. `teacher_log_probs`: per record of `source`, a distilling
  student's cached teacher targets (see BatchLoader).
  """
  modalities = tuple(config.data.modalities if modalities is None else modalities)
  dims = dict(config.data.dims if dims is None else dims)
  lengths = np.asarray(source.dialogue_lengths)
  shuffle_seed = seed if train else None
  if config.graph.scope == 'dialogue':
    plan = plan_dialogue_batches(lengths, budget, epoch_order(len(lengths), shuffle_seed, epoch))
  else:
    plan = plan_utterance_batches(lengths, config.batch.utterances_per_batch, shuffle_seed, epoch)
  augmented = tuple(m for m in modalities if augmented is None or m in augmented)
  loader = BatchLoader(
      source=source, budget=budget, modalities=modalities, dims=dims,
      speaker_edges=config.graph.speaker_edges, scope=config.graph.scope,
      augmentation=(Augmentation.from_config(config.augment)
                    if train and config.augment.enabled and augmented else None),
      augmented=augmented, teacher_log_probs=teacher_log_probs,
      teacher_classes=int(teacher_log_probs[0].shape[-1]) if teacher_log_probs else 0)
  ds = grain.MapDataset.source(group_plan(plan, budget))
  if loader.augmentation is not None:
    return ds.random_map(loader, seed=int(np.random.default_rng([seed, epoch, 7]).integers(2**31)))
  return ds.map(loader)
