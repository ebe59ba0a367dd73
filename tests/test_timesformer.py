"""Flax TimeSformer against the transformers PyTorch model, and checkpoint loading."""

import collections
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from flax import nnx  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

from mer_jax.models import hf_checkpoint
from mer_jax.models import timesformer as ts  # pylint: disable=g-import-not-at-top

TINY = dict(image_size=16, patch_size=4, num_channels=3, num_frames=4, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
TOL = 1e-4


def _save(folder, attention_type='divided_space_time', classifier=False):
  torch.manual_seed(0)
  cfg = transformers.TimesformerConfig(**TINY, attention_type=attention_type)
  model = (transformers.TimesformerForVideoClassification(cfg) if classifier
           else transformers.TimesformerModel(cfg))
  model.eval()
  # transformers starts the time embeddings at zero and LayerNorms at identity; perturb every
  # parameter so that a misplaced embedding, norm or bias shows in the outputs.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(folder, safe_serialization=True)
  return str(folder), model


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """attention_type -> (folder, torch model), each built once."""
  cache = {}

  def get(attention_type='divided_space_time'):
    if attention_type not in cache:
      cache[attention_type] = _save(tmp_path_factory.mktemp(attention_type), attention_type)
    return cache[attention_type]

  return get


def clips(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def reference(model, x):
  with torch.no_grad():
    return model(torch.tensor(x), output_hidden_states=True)


TRACES = collections.Counter()


@nnx.jit(static_argnames=('channels_last', 'all_hidden_states'))
def forward(model, x, channels_last=False, all_hidden_states=True):
  TRACES[x.shape, channels_last, all_hidden_states] += 1
  return model(x, channels_last=channels_last, all_hidden_states=all_hidden_states)


@nnx.jit
def features(model, x):
  TRACES['features', x.shape] += 1
  return model.utterance_features(x)


def max_diff(got, want) -> float:
  got = np.asarray(got)
  return float(np.abs(got - want.numpy().reshape(got.shape)).max())


def test_parity_with_transformers(saved):
  folder, ref = saved()
  cfg, ours = ts.load_hf_checkpoint(folder)
  assert cfg.attention_type == 'divided_space_time' and cfg.num_layers == 2
  x = clips(2, 4, 3, 16, 16)
  out = reference(ref, x)
  got = forward(ours, jnp.asarray(x))
  # transformers' hidden_states (embeddings, each layer before the final norm), then the output.
  assert len(got) == len(out.hidden_states) + 1 == 4
  diffs = [max_diff(g, r) for g, r in zip(got, [*out.hidden_states, out.last_hidden_state])]
  assert max(diffs) < TOL, diffs
  assert got[-1].shape == (2, 1 + 4 * 16, 32) and got[-1].dtype == jnp.float32
  # Frames of another size: the patch position embeddings are resized as transformers does.
  x = clips(1, 4, 3, 24, 16, seed=1)
  assert max_diff(forward(ours, jnp.asarray(x))[-1], reference(ref, x).last_hidden_state) < TOL


@pytest.mark.parametrize('attention_type', ['joint_space_time', 'space_only'])
def test_other_attention_types(saved, attention_type):
  folder, ref = saved(attention_type)
  _, ours = ts.load_hf_checkpoint(folder)
  # Six frames, not the config's four, of 24 x 16 pixels, not 16 x 16: transformers resizes the
  # time (joint_space_time) and position embeddings by nearest-neighbour interpolation.
  x = clips(2, 6, 3, 24, 16)
  out = reference(ref, x)
  got = forward(ours, jnp.asarray(x))
  # space_only: transformers' [B * T, 1 + N, D] as [B, T * (1 + N), D].
  assert got[-1].shape == ((2, 6 * 25, 32) if attention_type == 'space_only' else
                           (2, 1 + 6 * 24, 32))
  diffs = [max_diff(g, r) for g, r in zip(got, [*out.hidden_states, out.last_hidden_state])]
  assert max(diffs) < TOL, diffs


def test_channels_last_input(saved):
  folder, ref = saved()
  _, ours = ts.load_hf_checkpoint(folder)
  x = clips(2, 4, 3, 16, 16)
  first = forward(ours, jnp.asarray(x))[-1]
  last = forward(ours, jnp.asarray(x.transpose(0, 1, 3, 4, 2)), channels_last=True)[-1]
  np.testing.assert_allclose(np.asarray(last), np.asarray(first), atol=1e-6)
  assert max_diff(last, reference(ref, x).last_hidden_state) < TOL
  np.testing.assert_allclose(np.asarray(ts.to_channels_last(jnp.asarray(x))),
                             x.transpose(0, 1, 3, 4, 2))


def test_utterance_features_mean_pool(saved):
  folder, ref = saved()
  _, ours = ts.load_hf_checkpoint(folder)
  x = clips(2, 4, 3, 16, 16)
  want = reference(ref, x).last_hidden_state.mean(dim=1)
  got = features(ours, jnp.asarray(x))
  assert got.shape == (2, 32) and got.dtype == jnp.float32
  assert max_diff(got, want) < TOL


def test_video_classification_checkpoint(tmp_path):
  folder, ref = _save(tmp_path / 'k400', classifier=True)
  tensors = load_file(os.path.join(folder, 'model.safetensors'))
  assert any(k.startswith('timesformer.') for k in tensors) and 'classifier.weight' in tensors
  _, ours = ts.load_hf_checkpoint(folder)
  assert ts.load_weights(ours, tensors, 'x') == ['classifier.bias', 'classifier.weight']
  assert not any('classifier' in '/'.join(map(str, p))
                 for p, _ in nnx.to_flat_state(nnx.state(ours)))
  x = clips(2, 4, 3, 16, 16)
  with torch.no_grad():
    want = ref.timesformer(torch.tensor(x)).last_hidden_state
  assert max_diff(forward(ours, jnp.asarray(x))[-1], want) < TOL


def test_loader_failure_modes(saved, tmp_path):
  folder, _ = saved()
  tensors = load_file(os.path.join(folder, 'model.safetensors'))
  config = json.loads(open(os.path.join(folder, 'config.json')).read())
  with pytest.raises(hf_checkpoint.CheckpointError, match='no config.json'):
    ts.load_hf_checkpoint(str(tmp_path))
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'config.json').write_text(json.dumps(config))
  # One tensor deleted.
  save_file({k: v for k, v in tensors.items() if k != 'encoder.layer.1.temporal_dense.weight'},
            str(broken / 'model.safetensors'))
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match="missing tensor 'encoder.layer.1.temporal_dense.weight'"):
    ts.load_hf_checkpoint(str(broken))
  # A wrong shape.
  key = 'encoder.layer.0.temporal_attention.attention.qkv.weight'
  save_file({**tensors, key: np.zeros((95, 32), np.float32)}, str(broken / 'model.safetensors'))
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=r'temporal_attention.attention.qkv.weight.* shape \[95, 32\].*'
                     r'needs \[96, 32\]'):
    ts.load_hf_checkpoint(str(broken))
  # An unexpected tensor.
  save_file({**tensors, 'encoder.layer.9.adapter.weight': np.zeros(3, np.float32)},
            str(broken / 'model.safetensors'))
  with pytest.raises(hf_checkpoint.CheckpointError, match=r"unexpected tensors \['encoder.layer.9.adapter"):
    ts.load_hf_checkpoint(str(broken))
  # Unsupported settings name themselves; no weights.
  (broken / 'config.json').write_text(json.dumps({**config, 'attention_type': 'axial'}))
  with pytest.raises(hf_checkpoint.CheckpointError, match="attention_type 'axial' is not supported"):
    ts.load_hf_checkpoint(str(broken))
  (broken / 'config.json').write_text(json.dumps({**config, 'image_size': [16, 24]}))
  with pytest.raises(hf_checkpoint.CheckpointError, match=r'image_size \[16, 24\] is not supported'):
    ts.load_hf_checkpoint(str(broken))
  with pytest.raises(ValueError, match="model_type 'vit' is not supported"):
    ts.TimesformerConfig.from_hf({**config, 'model_type': 'vit'})
  (broken / 'config.json').write_text(json.dumps(config))
  os.remove(broken / 'model.safetensors')
  with pytest.raises(hf_checkpoint.CheckpointError, match='no model.safetensors'):
    ts.load_hf_checkpoint(str(broken))


def test_bad_inputs_are_named(saved):
  folder, _ = saved()
  _, ours = ts.load_hf_checkpoint(folder)
  with pytest.raises(ValueError, match='clips have 6 frames but the config has num_frames 4'):
    ours(jnp.zeros((1, 6, 3, 16, 16)))
  with pytest.raises(ValueError, match='pixel_values have 16 channels'):
    ours(jnp.zeros((1, 4, 3, 16, 16)), channels_last=True)
  with pytest.raises(ValueError, match=r'\[B, T, C, H, W\]'):
    ours(jnp.zeros((4, 3, 16, 16)))


def test_jit_compiles_once(saved):
  folder, _ = saved()
  _, ours = ts.load_hf_checkpoint(folder)
  before = TRACES['features', (2, 4, 3, 16, 16)]
  a = features(ours, jnp.asarray(clips(2, 4, 3, 16, 16, seed=1)))
  b = features(ours, jnp.asarray(clips(2, 4, 3, 16, 16, seed=2)))
  # Traced (and compiled) once in this file, here or by an earlier test with another loaded
  # model: a second batch of the same shape does not retrace.
  assert TRACES['features', (2, 4, 3, 16, 16)] == 1 and before <= 1
  assert np.isfinite(np.asarray(a)).all() and np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_training_dropout_and_bf16(saved, tmp_path):
  folder, _ = saved()
  config = json.loads(open(os.path.join(folder, 'config.json')).read())
  # Stochastic depth only: every dropout mask is a few more seconds of XLA compile on CPU.
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'drop_path_rate': 0.3}))
  shutil.copy(os.path.join(folder, 'model.safetensors'), tmp_path)
  cfg, model = ts.load_hf_checkpoint(str(tmp_path))
  assert cfg.drop_path_rate == 0.3
  x = jnp.asarray(clips(2, 4, 3, 16, 16))
  step = nnx.jit(lambda m, v, train: m(v, train=train), static_argnames='train')
  a, b = np.asarray(step(model, x, False)), np.asarray(step(model, x, False))
  np.testing.assert_array_equal(a, b)
  c, d = np.asarray(step(model, x, True)), np.asarray(step(model, x, True))
  assert np.abs(c - a).max() > 1e-3 and np.abs(d - c).max() > 1e-3  # the stream advances
  _, half = ts.load_hf_checkpoint(str(tmp_path), dtype=jnp.bfloat16)
  got = step(half, x, False)
  assert got.dtype == jnp.float32 and np.abs(np.asarray(got) - a).max() < 0.1
