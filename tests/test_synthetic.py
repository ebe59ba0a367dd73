"""Tests for the synthetic MELD-shaped corpus (mer_jax/data/synthetic.py)."""

import collections
import dataclasses
import time

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
import threadpoolctl

from mer_jax.run import corpus
from mer_jax.data import shards
from mer_jax.data import synthetic

SMALL_DIMS = {'t': 16, 'a': 16, 'v': 16}
MELD_PRIOR = (np.asarray(synthetic.MELD_TRAIN_CLASS_COUNTS)
              / sum(synthetic.MELD_TRAIN_CLASS_COUNTS))


@pytest.fixture(scope='module')
def big_sample():
  return synthetic.generate_records(
      seed=5, num_dialogues={'train': 2500}, dims=SMALL_DIMS)['train']


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
  kwargs = dict(num_dialogues={'train': 12, 'test': 4}, num_shards=2,
                dims={'t': 24, 'a': 20, 'v': 16})
  first = synthetic.generate_corpus(tmp_path / 'a', seed=7, **kwargs)
  again = synthetic.generate_corpus(tmp_path / 'b', seed=7, **kwargs)
  other = synthetic.generate_corpus(tmp_path / 'c', seed=8, **kwargs)
  assert first == again
  for split in ('train', 'test'):
    for entry in first.splits[split].files:
      assert (tmp_path / 'a' / entry.name).read_bytes() == (
          tmp_path / 'b' / entry.name).read_bytes()
    assert ([f.sha256 for f in first.splits[split].files]
            != [f.sha256 for f in other.splits[split].files])
  a = shards.DialogueShardSource(tmp_path / 'a', 'train')[0]
  c = shards.DialogueShardSource(tmp_path / 'c', 'train')[0]
  assert a.features['t'].tobytes() != c.features['t'][:len(a.labels)].tobytes()


def test_default_size_is_fast_and_meld_shaped(tmp_path):
  start = time.perf_counter()
  manifest = synthetic.generate_corpus(tmp_path / 'c', seed=1234)
  assert time.perf_counter() - start < 10.0
  assert manifest.dims == {'t': 1024, 'a': 1024, 'v': 768}
  assert manifest.label_names == synthetic.MELD_LABELS
  assert {s: i.num_dialogues for s, i in manifest.splits.items()} == {
      'train': 360, 'dev': 60, 'test': 120}
  train = manifest.splits['train']
  assert 3000 < train.num_utterances < 4200  # MELD: 9.6 utterances/dialogue
  assert train.max_dialogue_len <= 33


def test_class_prior_is_meld_like(big_sample):
  labels = np.concatenate([r.labels for r in big_sample])
  assert labels.min() >= 0  # every utterance is labelled
  frequencies = np.bincount(labels, minlength=7) / len(labels)
  np.testing.assert_allclose(frequencies, MELD_PRIOR, atol=0.03)
  assert np.argmax(frequencies) == 0  # neutral dominates, as in MELD
  assert frequencies[0] > 0.4


def test_dialogue_lengths_and_speakers_are_meld_like(big_sample):
  lengths = np.array([r.num_utterances for r in big_sample])
  assert lengths.min() == 1 and lengths.max() <= 33
  assert 8.5 < lengths.mean() < 11.0  # MELD train: 9.6
  assert np.mean(lengths <= 24) > 0.98
  assert np.mean((lengths >= 5) & (lengths <= 12)) > 0.4
  speakers = collections.Counter(len(set(r.speakers)) for r in big_sample
                                 if r.num_utterances > 1)
  total = sum(speakers.values())
  assert max(speakers) <= 9
  assert sum(speakers[k] for k in (2, 3, 4)) / total > 0.85
  assert all(len(set(r.speakers)) == 1 for r in big_sample
             if r.num_utterances == 1)
  # Zipf-like turn taking: the most active speaker takes about half the turns.
  top_share = np.mean([collections.Counter(r.speakers).most_common(1)[0][1]
                       / r.num_utterances for r in big_sample
                       if r.num_utterances >= 6])
  assert 0.4 < top_share < 0.7
  for r in big_sample[:50]:
    np.testing.assert_array_equal(r.speaker_ids,
                                  shards.speaker_ranks(r.speakers))
    assert all(isinstance(t, str) and t for t in r.transcripts)


def test_missing_modality_rates(big_sample):
  for m, rate in (('t', 0.0), ('a', 0.05), ('v', 0.12)):
    present = np.concatenate([r.present[m] for r in big_sample])
    assert abs((1 - present.mean()) - rate) < 0.01, m
    features = np.concatenate([r.features[m] for r in big_sample])
    assert not np.any(features[~present])
    assert np.all(np.abs(features[present]).sum(axis=1) > 0)


def test_emotions_persist_per_speaker(big_sample):
  agree = []
  for r in big_sample:
    last = {}
    for speaker, label in zip(r.speaker_ids, r.labels):
      if speaker in last:
        agree.append(last[speaker] == label)
      last[speaker] = label
  chance = np.sum(MELD_PRIOR ** 2)  # about 0.29
  assert np.mean(agree) > chance + 0.3


def test_label_noise_rate():
  kwargs = dict(seed=3, num_dialogues={'train': 800}, dims=SMALL_DIMS)
  clean = synthetic.generate_records(
      story=dataclasses.replace(synthetic.CorpusStory(), label_noise=0.0),
      **kwargs)['train']
  noisy = synthetic.generate_records(**kwargs)['train']
  clean_labels = np.concatenate([r.labels for r in clean])
  noisy_labels = np.concatenate([r.labels for r in noisy])
  # Emotions are drawn before the noise, so only the flips differ.
  assert abs(np.mean(clean_labels != noisy_labels) - 0.08) < 0.01


def _graph_neighbours(z, speaker_ids):
  """Concatenates z with its temporal and same-speaker neighbours (or 0)."""
  zero = np.zeros_like(z[:1])
  previous = np.concatenate([zero, z[:-1]])
  following = np.concatenate([z[1:], zero])
  same_previous, same_following = np.zeros_like(z), np.zeros_like(z)
  last = {}
  for i, speaker in enumerate(speaker_ids):
    if speaker in last:
      same_previous[i] = z[last[speaker]]
      same_following[last[speaker]] = z[i]
    last[speaker] = i
  return np.concatenate(
      [z, previous, following, same_previous, same_following], axis=1)


def _oracle_views(records, maps):
  """Per-utterance class-subspace projections, plus text with context."""
  views = {m: np.concatenate([r.features[m] @ maps[m].T for r in records])
           for m in maps}
  views['tav'] = np.concatenate([views[m] for m in 'tav'], axis=1)
  views['t+context'] = np.concatenate([
      _graph_neighbours(r.features['t'] @ maps['t'].T, r.speaker_ids)
      for r in records])
  return views, np.concatenate([r.labels for r in records])


def test_modalities_are_complementary_and_context_helps():
  # A linear probe on the true class subspaces: what a model could reach.
  corpus = synthetic.generate_records(
      seed=11, num_dialogues={'train': 360, 'test': 120})
  maps = synthetic.class_subspaces(seed=11)
  assert all(np.allclose(w @ w.T, np.eye(16), atol=1e-5)
             for w in maps.values())
  train, y = _oracle_views(corpus['train'], maps)
  test, y_test = _oracle_views(corpus['test'], maps)
  scores = {}
  with threadpoolctl.threadpool_limits(1):  # tiny fits; threads only contend
    for view in train:
      model = LogisticRegression(max_iter=1000).fit(train[view], y)
      scores[view] = f1_score(y_test, model.predict(test[view]),
                              average='weighted')
  majority = f1_score(y_test, np.zeros_like(y_test), average='weighted')
  assert majority + 0.1 < min(scores['a'], scores['v'])
  assert max(scores['a'], scores['v']) + 0.1 < scores['t'] < 0.8
  assert scores['tav'] > scores['t'] + 0.05
  assert scores['t+context'] > scores['t'] + 0.02


def test_rejects_unknown_modalities_and_small_dims():
  with pytest.raises(ValueError, match=r"no story for modalities \['x'\]"):
    synthetic.generate_records(seed=0, dims={'t': 16, 'x': 16})
  with pytest.raises(ValueError, match=r"dims\['v'\] = 8 is below"):
    synthetic.generate_records(seed=0, dims={'t': 16, 'v': 8})
  with pytest.raises(ValueError, match='7 MELD classes; got 3'):
    synthetic.generate_records(seed=0, label_names=('a', 'b', 'c'))


def test_story_round_trips_through_plain_values_and_names_bad_keys():
  story = synthetic.CorpusStory()
  values = dataclasses.asdict(story)
  assert synthetic.story_from_dict(values) == story
  changed = dataclasses.asdict(story)
  changed['label_noise'] = 0.2
  changed['modalities']['a']['signal'] = 3.0
  changed['modalities']['v']['groups'] = [[0, 1, 2, 3, 4, 5, 6]]
  new = synthetic.story_from_dict(changed)
  assert new.label_noise == 0.2 and new.modalities['a'].signal == 3.0
  assert new.modalities['v'].groups == ((0, 1, 2, 3, 4, 5, 6),)

  def broken(edit):
    v = dataclasses.asdict(story)
    edit(v)
    return v

  cases = [
      (lambda v: v.update(lable_noise=0.1), r"story: unknown keys \['lable_noise'\]"),
      (lambda v: v.pop('cue_rate'), r"story: missing keys \['cue_rate'\]"),
      (lambda v: v['modalities']['a'].update(weak_rate=1.5),
       r'story\.modalities\.a\.weak_rate = 1\.5 is not in \[0, 1\]'),
      (lambda v: v['modalities']['t'].update(signal=0.0),
       r'story\.modalities\.t\.signal = 0\.0 must be > 0'),
      (lambda v: v.update(style_per_dim=-0.3), r'story\.style_per_dim = -0\.3 must be >= 0'),
      (lambda v: v.update(speaker_repeat_weight=0.0),
       r'story\.speaker_repeat_weight = 0\.0 must be > 0'),
      (lambda v: v.update(keep_own_emotion=0.9),
       r'keep_own_emotion \+ story\.copy_previous_emotion must be <= 1'),
      (lambda v: v['modalities']['v'].update(groups=[[0, 1], [2, 3]]),
       r'story\.modalities\.v\.groups: .* must hold each class index once'),
  ]
  for edit, message in cases:
    with pytest.raises(ValueError, match=message):
      synthetic.story_from_dict(broken(edit))


def test_config_story_sets_the_corpus_and_its_cache_folder(tmp_path):
  from configs import default  # pylint: disable=g-import-not-at-top
  from mer_jax.config_validation import ConfigError, validate_config  # pylint: disable=g-import-not-at-top
  config = default.get_config('tiny')
  config.data.synthetic.num_dialogues = {'train': 30, 'dev': 2, 'test': 2}
  assert synthetic.story_from_config(config) == synthetic.CorpusStory()
  clean = default.get_config('tiny')
  clean.data.synthetic.num_dialogues = {'train': 30, 'dev': 2, 'test': 2}
  clean.data.synthetic.story.label_noise = 0.0
  assert corpus.synthetic_dir(clean, str(tmp_path)) != corpus.synthetic_dir(config,
                                                                                str(tmp_path))
  # The generator reads the config's story. Emotions are drawn before the label noise, so the
  # labels differ exactly where the default story flips one (8%).
  def labels(c):
    folder = corpus.ensure_synthetic(c, str(tmp_path))
    src = shards.DialogueShardSource(folder, 'train', modalities=('t',))
    return np.concatenate([src[i].labels for i in range(len(src))])
  noisy, exact = labels(config), labels(clean)
  assert len(noisy) == len(exact) and 0.03 < np.mean(noisy != exact) < 0.15

  config.data.synthetic.story.modalities.a.missing_rate = -0.1
  with pytest.raises(ConfigError, match=r'data\.synthetic\.story\.modalities\.a\.missing_rate'):
    validate_config(config)


def test_shared_weakness_silences_every_modality_on_the_same_utterances():
  story = synthetic.CorpusStory()
  no_own_weakness = {m: dataclasses.replace(s, weak_rate=0.0)
                     for m, s in story.modalities.items()}
  story = dataclasses.replace(story, modalities=no_own_weakness,
                              shared_weak_rate=0.3)
  records = synthetic.generate_records(
      seed=4, num_dialogues={'train': 300}, dims=SMALL_DIMS, story=story)['train']
  maps = synthetic.class_subspaces(seed=4, dims=SMALL_DIMS, story=story)
  # Text is weak exactly where its transcript is a bare interjection.
  weak = np.concatenate([[t in synthetic._INTERJECTIONS for t in r.transcripts]
                         for r in records])
  assert abs(weak.mean() - 0.3) < 0.03
  for m in 'av':
    present = np.concatenate([r.present[m] for r in records])
    # The class signal along the utterance's own emotion mean, per modality.
    low = np.concatenate([r.features[m] @ maps[m].T for r in records])
    means = synthetic._world(4, SMALL_DIMS, story).class_means[m]
    along = np.einsum('nk,nk->n', low, means[np.concatenate(
        [r.labels for r in records])])
    # About 12x with shared weakness; about 1x were the same rate independent per modality.
    assert along[present & ~weak].mean() > 5 * along[present & weak].mean(), m
