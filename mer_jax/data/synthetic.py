"""A deterministic, MELD-shaped synthetic corpus of multimodal dialogues.

The corpus stands in for MELD where real features are unavailable, and is built
so that context, every modality and soft targets each have something to add.
Its generative story (all randomness from `seed`):

1. World, shared by all splits. Per modality m, a random orthonormal map
   `W_m: R^k -> R^{d_m}` (k = 16) and one mean per class in R^k. Classes form
   groups: groups sit on orthogonal unit directions, and the classes of a group
   differ only by `within_group` along directions of their own. Each modality
   groups the classes differently, so the modalities are partly complementary:
     text   [neutral] [surprise fear] [sadness] [joy] [disgust anger]
     audio  [neutral sadness] [surprise joy] [fear] [disgust] [anger]
     visual [neutral] [surprise fear] [sadness disgust] [joy] [anger]
   Each name of a speaker pool gets a style vector per modality.
2. Dialogue shape. Length from MELD's train histogram (1-24, a thin tail up to
   33); 2-9 speaker slots (MELD's counts, capped by the length; a single
   utterance has one speaker); names drawn from the pool with the six main
   characters ten times as likely; turns drawn with Zipf weights over the
   slots, an immediate repeat of the same speaker being less likely.
3. Emotions. A speaker keeps their own previous emotion with p = 0.65; else the
   utterance copies the previous utterance's emotion with p = 0.15; else it is
   drawn from MELD's train class prior. Temporal and same-speaker neighbours
   thus carry evidence about an utterance's emotion.
4. Features. `x_m = W_m (a s_m mu_m[emotion] + o_dialogue + u_speaker)
   + style_speaker + offset_dialogue + N(0, I)`, intensity a ~ U(0.7, 1.3)
   except in a `weak_rate` fraction of utterances (independently per
   modality; text 35%, the bare interjections of MELD, audio and visual 20%)
   where a = 0.1 and the modality says next to nothing. Signal scales s_m:
   text 6.0, audio 2.4, visual 1.9. Optionally (`shared_weak_rate`, 0 by
   default) a further fraction of utterances is weak in every modality at
   once, as a backchannel says little in words, voice or face alike.
5. Missing modalities: audio is absent in 5% of utterances and visual in 12%
   (features zero, present False); text is always present.
6. Labels: 8% are replaced by another class drawn from the prior (in every
   split; features follow the true emotion). This caps attainable scores and
   leaves room for a teacher's soft targets. Neutral drops from 47% to ~45%.
7. Transcripts: a bare interjection where text is weak, else a template
   sentence, half of them with a cue of the emotion.

Every parameter above is a field of `CorpusStory`; runs set them through
`config.data.synthetic.story` (`story_from_dict`).

Calibration at the default size and dims (train 360 / test 120 dialogues;
test weighted F1 of StandardScaler + LogisticRegression on single utterances,
mean of seeds 1234, 1, 2): text 0.55, audio 0.39, visual 0.38, concatenated
0.64; text plus the mean of the same speaker's earlier turns 0.58. The
difficulty is tuned for these dims: with far smaller dims a linear probe finds
the class subspace easily. `class_subspaces` gives an oracle probe (what a
model could reach): text 0.70-0.73, audio and visual 0.52-0.58, concatenated
0.80-0.83, text with its temporal and same-speaker neighbours 0.76-0.78.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Mapping, Sequence

from etils import epath
import numpy as np

from mer_jax.data import shards

MELD_LABELS = ('neutral', 'surprise', 'fear', 'sadness', 'joy', 'disgust',
               'anger')
MELD_TRAIN_CLASS_COUNTS = (4710, 1205, 268, 683, 1743, 271, 1109)
# Dialogues per length 1..24 in MELD train, then a thin tail up to 33.
MELD_TRAIN_LENGTH_COUNTS = (70, 60, 54, 48, 67, 61, 74, 67, 50, 57, 55, 54, 36,
                            41, 43, 51, 30, 28, 27, 20, 20, 13, 7, 5,
                            2, 2, 1, 1, 1, 1, 1, 1, 1)
# Dialogues with 2..9 speakers in MELD train (multi-utterance dialogues).
MELD_TRAIN_SPEAKER_COUNTS = (463, 264, 122, 58, 25, 8, 2, 1)
DEFAULT_DIMS = {'t': 1024, 'a': 1024, 'v': 768}
DEFAULT_NUM_DIALOGUES = {'train': 360, 'dev': 60, 'test': 120}

_N, _SU, _FE, _SA, _JO, _DI, _AN = range(7)
_MAIN_CAST = ('Chandler', 'Joey', 'Monica', 'Phoebe', 'Rachel', 'Ross')
_GUEST_CAST = ('Janice', 'Gunther', 'Carol', 'Susan', 'Emily', 'Richard',
               'Mike', 'Charlie', 'Tag', 'Kathy', 'Mona', 'Frank', 'Ursula',
               'Estelle', 'Jack', 'Judy', 'Ben', 'Amy', 'Paul', 'Elizabeth',
               'The Waiter', 'The Doctor', 'The Interviewer', 'Mr. Heckles',
               'Dr. Green', 'Mrs. Geller')
_NAMES = _MAIN_CAST + _GUEST_CAST

_CUE_TEMPLATES = (
    ('So what are we doing about {thing}?', 'I told {name} about {thing}.',
     'We can talk about it at {place}.'),
    ('Wait, {name} did what?', 'No way, {thing}? Really?',
     'Whoa, I did not see that coming!'),
    ('I am really scared of {thing}.', 'What if {name} finds out?',
     'Please, do not make me go to {place}.'),
    ('I really miss {name}.', 'It is over, {thing} is gone.',
     'Nothing good ever happens at {place}.'),
    ('This is the best {thing} ever!', 'I love you, {name}!',
     'We are going to {place}, yay!'),
    ('Ew, that {thing} is gross.', 'How can {name} eat that?',
     'I am not touching anything at {place}.'),
    ('How could you do that to {name}?', 'Get out of {place}, now!',
     'I am so sick of {thing}!'),
)
_INTERJECTIONS = ('Oh.', 'Yeah.', 'Okay.', 'What?', 'Hey.', 'Right.', 'Uh-huh.',
                  'Wow.', 'Hi.', 'No.')
_PLAIN_TEMPLATES = ('Hey {name}, got a minute?', 'Did you bring the {thing}?',
                    'I will see you at {place}.', 'Okay, so {name} called.',
                    'Is that the {thing} from {place}?')
_THINGS = ('the couch', 'the duck', 'the lasagna', 'the apartment', 'the job',
           'the wedding', 'the sandwich', 'the present')
_PLACES = ('Central Perk', 'the museum', 'the airport', 'the hospital',
           "Monica's", 'the office')


@dataclasses.dataclass(frozen=True)
class ModalityStory:
  """How one modality shows the emotion."""

  groups: tuple[tuple[int, ...], ...]  # classes that this modality confuses
  signal: float  # scale of the class signal (noise has unit scale)
  weak_rate: float  # fraction of utterances where it carries little signal
  missing_rate: float  # fraction of utterances where it is absent


@dataclasses.dataclass(frozen=True)
class CorpusStory:
  """Parameters of the generative story (see the module docstring)."""

  modalities: Mapping[str, ModalityStory] = dataclasses.field(
      default_factory=lambda: {
          't': ModalityStory(((_N,), (_SU, _FE), (_SA,), (_JO,), (_DI, _AN)),
                             signal=6.0, weak_rate=0.35, missing_rate=0.0),
          'a': ModalityStory(((_N, _SA), (_SU, _JO), (_FE,), (_DI,), (_AN,)),
                             signal=2.4, weak_rate=0.2, missing_rate=0.05),
          'v': ModalityStory(((_N,), (_SU, _FE), (_SA, _DI), (_JO,), (_AN,)),
                             signal=1.9, weak_rate=0.2, missing_rate=0.12),
      })
  subspace_dim: int = 16
  within_group: float = 0.25  # distance scale between classes of a group
  weak_intensity: float = 0.1
  keep_own_emotion: float = 0.65
  copy_previous_emotion: float = 0.15
  label_noise: float = 0.08
  shared_weak_rate: float = 0.0  # utterances weak in every modality at once
  speaker_repeat_weight: float = 0.3  # relative weight of the same speaker
  zipf_exponent: float = 1.0
  style_in_subspace: float = 0.3
  style_per_dim: float = 0.3
  offset_in_subspace: float = 0.3
  offset_per_dim: float = 0.3
  cue_rate: float = 0.5  # transcripts with an emotion cue


def story_from_dict(values: Mapping) -> CorpusStory:
  """A `CorpusStory` from nested plain values (`dataclasses.asdict` of one).

  Raises ValueError naming the first key that is unknown, missing or out of
  range.
  """
  def fields_of(cls, given: Mapping, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = sorted(set(given) - names), sorted(names - set(given))
    if unknown or missing:
      raise ValueError(
          f'{where}: unknown keys {unknown}, missing keys {missing}'
          if unknown else f'{where}: missing keys {missing}')
    return dict(given)

  values = fields_of(CorpusStory, values, 'story')
  modalities = {}
  for m, given in values.pop('modalities').items():
    f = fields_of(ModalityStory, given, f'story.modalities.{m}')
    f['groups'] = tuple(tuple(int(c) for c in g) for g in f['groups'])
    modalities[m] = ModalityStory(**f)
    for rate in ('weak_rate', 'missing_rate'):
      if not 0.0 <= f[rate] <= 1.0:
        raise ValueError(
            f'story.modalities.{m}.{rate} = {f[rate]} is not in [0, 1]')
    if f['signal'] <= 0:
      raise ValueError(
          f'story.modalities.{m}.signal = {f["signal"]} must be > 0')
  for rate in ('keep_own_emotion', 'copy_previous_emotion', 'label_noise',
               'shared_weak_rate', 'cue_rate'):
    if not 0.0 <= values[rate] <= 1.0:
      raise ValueError(f'story.{rate} = {values[rate]} is not in [0, 1]')
  for scale in ('within_group', 'weak_intensity', 'zipf_exponent',
                'style_in_subspace', 'style_per_dim', 'offset_in_subspace',
                'offset_per_dim'):
    if values[scale] < 0:
      raise ValueError(f'story.{scale} = {values[scale]} must be >= 0')
  if values['speaker_repeat_weight'] <= 0:
    raise ValueError('story.speaker_repeat_weight = '
                     f'{values["speaker_repeat_weight"]} must be > 0')
  if values['keep_own_emotion'] + values['copy_previous_emotion'] > 1.0:
    raise ValueError('story.keep_own_emotion + story.copy_previous_emotion '
                     'must be <= 1')
  story = CorpusStory(modalities=modalities, **values)
  for m, modality in modalities.items():
    try:
      _class_means(modality.groups, np.eye(story.subspace_dim),
                   story.within_group)
    except ValueError as e:
      raise ValueError(f'story.modalities.{m}.groups: {e}') from None
  return story


def story_from_config(config) -> CorpusStory:
  """The embedded corpus's generative story: config.data.synthetic.story (CorpusStory's fields)."""
  return story_from_dict(config.data.synthetic.story.to_dict())


@dataclasses.dataclass(frozen=True)
class _World:
  maps: Mapping[str, np.ndarray]  # m -> float32[k, d_m], orthonormal rows
  class_means: Mapping[str, np.ndarray]  # m -> float32[C, k]
  style_in_subspace: Mapping[str, np.ndarray]  # m -> float32[names, k]
  style_per_dim: Mapping[str, np.ndarray]  # m -> float32[names, d_m]


def _class_means(groups: Sequence[Sequence[int]], basis: np.ndarray,
                 within_group: float) -> np.ndarray:
  """Group centres on basis rows; classes of a group get own offset rows."""
  members = sorted(c for group in groups for c in group)
  if members != list(range(len(MELD_LABELS))):
    raise ValueError(f'groups {groups} must hold each class index once')
  needed = len(groups) + sum(len(g) for g in groups if len(g) > 1)
  if needed > len(basis):
    raise ValueError(f'groups {groups} need {needed} directions, the class '
                     f'subspace has {len(basis)}')
  rows = iter(basis)
  means = np.zeros((len(MELD_LABELS), basis.shape[1]))
  for group in groups:
    centre = next(rows)
    for c in group:
      means[c] = centre + (within_group * next(rows) if len(group) > 1 else 0)
  return means


def _make_world(rng: np.random.Generator, dims: Mapping[str, int],
                story: CorpusStory, num_names: int) -> _World:
  k = story.subspace_dim
  maps, means, style_sub, style_dim = {}, {}, {}, {}
  for m, d in dims.items():
    maps[m] = np.linalg.qr(rng.standard_normal((d, k)))[0].T.astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((k, k)))[0]
    means[m] = _class_means(story.modalities[m].groups, basis,
                            story.within_group).astype(np.float32)
    style_sub[m] = (story.style_in_subspace
                    * rng.standard_normal((num_names, k))).astype(np.float32)
    style_dim[m] = (story.style_per_dim
                    * rng.standard_normal((num_names, d))).astype(np.float32)
  return _World(maps, means, style_sub, style_dim)


def _dialogue_emotions(rng: np.random.Generator, turns: np.ndarray,
                       story: CorpusStory, prior: np.ndarray) -> np.ndarray:
  """Emotion per turn: persistence per speaker, contagion, else the prior."""
  emotions = np.empty(len(turns), np.int32)
  last_by_speaker: dict[int, int] = {}
  for i, speaker in enumerate(turns):
    u = rng.random()
    if speaker in last_by_speaker and u < story.keep_own_emotion:
      emotions[i] = last_by_speaker[speaker]
    elif i > 0 and u < story.keep_own_emotion + story.copy_previous_emotion:
      emotions[i] = emotions[i - 1]
    else:
      emotions[i] = rng.choice(len(prior), p=prior)
    last_by_speaker[int(speaker)] = int(emotions[i])
  return emotions


def _dialogue_turns(rng: np.random.Generator, length: int,
                    story: CorpusStory) -> np.ndarray:
  """Speaker slot (0..S-1) per turn with Zipf weights."""
  if length == 1:
    return np.zeros(1, np.int32)
  weights = np.asarray(MELD_TRAIN_SPEAKER_COUNTS, float)
  num_speakers = min(2 + rng.choice(len(weights), p=weights / weights.sum()),
                     length)
  zipf = 1.0 / np.arange(1, num_speakers + 1) ** story.zipf_exponent
  turns = np.empty(length, np.int32)
  for i in range(length):
    p = zipf.copy()
    if i > 0:
      p[turns[i - 1]] *= story.speaker_repeat_weight
    turns[i] = rng.choice(num_speakers, p=p / p.sum())
  return turns


def _transcript(rng: np.random.Generator, emotion: int, speaker: str,
                cast: Sequence[str], text_is_weak: bool, cue_rate: float
                ) -> str:
  """A template line; weak text gets a bare interjection."""
  if text_is_weak:
    return _INTERJECTIONS[rng.integers(len(_INTERJECTIONS))]
  templates = (_CUE_TEMPLATES[emotion] if rng.random() < cue_rate
               else _PLAIN_TEMPLATES)
  other = [n for n in cast if n != speaker] or [speaker]
  return templates[rng.integers(len(templates))].format(
      name=other[rng.integers(len(other))],
      thing=_THINGS[rng.integers(len(_THINGS))],
      place=_PLACES[rng.integers(len(_PLACES))])


def _sample_dialogues(rng: np.random.Generator, num_dialogues: int,
                      story: CorpusStory, num_names: int, prior: np.ndarray
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(speaker name index per turn, emotion per turn) for each dialogue."""
  lengths = np.asarray(MELD_TRAIN_LENGTH_COUNTS, float)
  popularity = np.array([10.0] * len(_MAIN_CAST)
                        + [1.0] * (num_names - len(_MAIN_CAST)))
  dialogues = []
  for _ in range(num_dialogues):
    length = 1 + rng.choice(len(lengths), p=lengths / lengths.sum())
    turns = _dialogue_turns(rng, length, story)
    cast = rng.choice(num_names, size=turns.max() + 1, replace=False,
                      p=popularity / popularity.sum())
    dialogues.append((cast[turns],
                      _dialogue_emotions(rng, turns, story, prior)))
  return dialogues


def _noisy_labels(rng: np.random.Generator, emotion: np.ndarray,
                  prior: np.ndarray, rate: float) -> np.ndarray:
  """Replaces a `rate` fraction of labels by another class from the prior."""
  labels = emotion.astype(np.int32)
  for i in np.flatnonzero(rng.random(len(emotion)) < rate):
    p = prior.copy()
    p[emotion[i]] = 0.0
    labels[i] = rng.choice(len(p), p=p / p.sum())
  return labels


def _modality_features(rng: np.random.Generator, m: str, d: int,
                       world: _World, story: CorpusStory, emotion: np.ndarray,
                       speaker: np.ndarray, dialogue: np.ndarray,
                       shared_weak: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Features float32[N, d], present bool[N] and weak-signal bool[N]."""
  modality = story.modalities[m]
  total, num_dialogues = len(emotion), dialogue.max() + 1
  weak = (rng.random(total) < modality.weak_rate) | shared_weak
  intensity = np.where(weak, story.weak_intensity,
                       rng.uniform(0.7, 1.3, total))
  low = intensity[:, None] * modality.signal * world.class_means[m][emotion]
  low += story.offset_in_subspace * rng.standard_normal(
      (num_dialogues, story.subspace_dim))[dialogue]
  low += world.style_in_subspace[m][speaker]
  x = low.astype(np.float32) @ world.maps[m]
  x += world.style_per_dim[m][speaker]
  x += (story.offset_per_dim * rng.standard_normal(
      (num_dialogues, d), dtype=np.float32))[dialogue]
  x += rng.standard_normal((total, d), dtype=np.float32)
  present = rng.random(total) >= modality.missing_rate
  x[~present] = 0.0
  return x, present, weak


def _split_records(rng: np.random.Generator, split: str, num_dialogues: int,
                   world: _World, dims: Mapping[str, int], story: CorpusStory,
                   names: Sequence[str]) -> list[shards.DialogueRecord]:
  """Samples one split; features are drawn for all utterances at once."""
  prior = np.asarray(MELD_TRAIN_CLASS_COUNTS, float)
  prior /= prior.sum()
  dialogues = _sample_dialogues(rng, num_dialogues, story, len(names), prior)
  speaker = np.concatenate([s for s, _ in dialogues])
  emotion = np.concatenate([e for _, e in dialogues])
  dialogue = np.repeat(np.arange(num_dialogues),
                       [len(e) for _, e in dialogues])
  labels = _noisy_labels(rng, emotion, prior, story.label_noise)
  features, present, weak = {}, {}, {}
  # Drawn only when used, so the default corpus keeps its bytes.
  shared_weak = np.zeros(len(emotion), bool)
  if story.shared_weak_rate > 0:
    shared_weak = rng.random(len(emotion)) < story.shared_weak_rate
  for m, d in dims.items():
    features[m], present[m], weak[m] = _modality_features(
        rng, m, d, world, story, emotion, speaker, dialogue, shared_weak)
  text_is_weak = weak.get('t', np.zeros(len(emotion), bool))

  records = []
  starts = np.searchsorted(dialogue, np.arange(num_dialogues))
  for i, start in enumerate(starts):
    rows = slice(start, start + len(dialogues[i][0]))
    speakers = [names[j] for j in speaker[rows]]
    cast = sorted(set(speakers))
    records.append(shards.DialogueRecord(
        dialogue_id=f'{split}_{i:05d}',
        utterance_ids=np.arange(len(speakers), dtype=np.int32),
        speakers=speakers,
        speaker_ids=shards.speaker_ranks(speakers),
        labels=labels[rows],
        transcripts=[_transcript(rng, e, s, cast, w, story.cue_rate)
                     for e, s, w in zip(emotion[rows], speakers,
                                        text_is_weak[rows])],
        features={m: features[m][rows] for m in dims},
        present={m: present[m][rows] for m in dims}))
  return records


def _world(seed: int, dims: Mapping[str, int], story: CorpusStory) -> _World:
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
  return _make_world(rng, dims, story, len(_NAMES))


def class_subspaces(*, seed: int, dims: Mapping[str, int] | None = None,
                    story: CorpusStory = CorpusStory()
                    ) -> dict[str, np.ndarray]:
  """The maps W_m (float32[k, d_m], orthonormal rows) of a seed's world.

  `features[m] @ W_m.T` projects onto the class subspace: an oracle probe for
  analysing the corpus (what a model could reach), not for training.
  """
  dims = dict(DEFAULT_DIMS if dims is None else dims)
  return dict(_world(seed, dims, story).maps)


def _split_rng(seed: int, split: str) -> np.random.Generator:
  return np.random.default_rng(
      np.random.SeedSequence(seed, spawn_key=(1, zlib.crc32(split.encode()))))


def generate_records(
    *, seed: int,
    num_dialogues: Mapping[str, int] | None = None,
    dims: Mapping[str, int] | None = None,
    label_names: Sequence[str] = MELD_LABELS,
    story: CorpusStory = CorpusStory(),
) -> dict[str, list[shards.DialogueRecord]]:
  """Samples the corpus in memory: split -> dialogue records."""
  num_dialogues = dict(DEFAULT_NUM_DIALOGUES if num_dialogues is None
                       else num_dialogues)
  dims = dict(DEFAULT_DIMS if dims is None else dims)
  if len(label_names) != len(MELD_LABELS):
    raise ValueError(f'the story has {len(MELD_LABELS)} MELD classes; got '
                     f'{len(label_names)} label_names')
  unknown = set(dims) - set(story.modalities)
  if unknown:
    raise ValueError(f'no story for modalities {sorted(unknown)}; known: '
                     f'{sorted(story.modalities)}')
  for m, d in dims.items():
    if d < story.subspace_dim:
      raise ValueError(f'dims[{m!r}] = {d} is below the class subspace '
                       f'dimension {story.subspace_dim}')
  world = _world(seed, dims, story)
  return {split: _split_records(_split_rng(seed, split), split, n, world, dims,
                                story, _NAMES)
          for split, n in num_dialogues.items()}


def generate_corpus(
    out_dir: epath.PathLike, *, seed: int,
    num_dialogues: Mapping[str, int] | None = None,
    num_shards: int | Mapping[str, int] = 1,
    dims: Mapping[str, int] | None = None,
    label_names: Sequence[str] = MELD_LABELS,
    story: CorpusStory = CorpusStory(),
    overwrite: bool = False,
) -> shards.Manifest:
  """Writes the synthetic corpus as a shard folder and returns its manifest."""
  dims = dict(DEFAULT_DIMS if dims is None else dims)
  splits = generate_records(seed=seed, num_dialogues=num_dialogues, dims=dims,
                            label_names=label_names, story=story)
  return shards.write_shards(out_dir, splits, label_names=label_names,
                             dims=dims, num_shards=num_shards,
                             overwrite=overwrite)
