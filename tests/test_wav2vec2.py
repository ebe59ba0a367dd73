"""The Flax wav2vec2 encoder against transformers' PyTorch Wav2Vec2Model, and checkpoint loading."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from flax import nnx  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

from mer_jax.models import hf_checkpoint
from mer_jax.models import wav2vec2 as w2v  # pylint: disable=g-import-not-at-top

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
# wav2vec2-base style (group norm, post-LN) and large-robust style (layer norm, pre-LN).
VARIANTS = {
    'group': dict(feat_extract_norm='group', do_stable_layer_norm=False, conv_bias=False),
    'layer': dict(feat_extract_norm='layer', do_stable_layer_norm=True, conv_bias=True),
}
LENGTHS = (4000, 2900, 1700)
TOL = 1e-4


def _perturb(model):
  # transformers initialises norms to 1/0 and biases to 0: make every tensor distinct so a
  # mis-mapped one shows up.
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _tiny_config(variant: str):
  return transformers.Wav2Vec2Config(**TINY, **VARIANTS[variant])


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """variant -> (folder, reference model); built once for the module."""
  out = {}
  for variant in VARIANTS:
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(_tiny_config(variant))
    _perturb(model)
    model.eval()
    folder = tmp_path_factory.mktemp(variant)
    model.save_pretrained(folder, safe_serialization=True)
    out[variant] = (str(folder), model)
  return out


def padded_batch():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(len(LENGTHS), max(LENGTHS))).astype(np.float32)
  mask = np.zeros(values.shape, np.int64)
  for r, n in enumerate(LENGTHS):
    mask[r, :n] = 1
  # Padding is garbage, not zeros: valid frames must not depend on it.
  values = np.where(mask > 0, values, 0.5 * rng.normal(size=values.shape)).astype(np.float32)
  return values, mask


def _run_ref(ref, values, mask=None, **kwargs):
  with torch.no_grad():
    return ref(torch.tensor(values), attention_mask=None if mask is None else torch.tensor(mask),
               **kwargs)


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_parity_with_transformers(saved, variant):
  folder, ref = saved[variant]
  cfg, ours = w2v.load_hf_checkpoint(folder)
  assert cfg.feat_extract_norm == variant and cfg.num_layers == 2
  assert cfg.do_stable_layer_norm == (variant == 'layer')
  values, mask = padded_batch()
  frames = w2v.feature_lengths(cfg, np.array(LENGTHS))
  got = ours(jnp.asarray(values), jnp.asarray(mask), all_hidden_states=True)
  last = np.asarray(ours(jnp.asarray(values), jnp.asarray(mask)))
  assert len(got) == cfg.num_layers + 1 and got[-1].shape == last.shape
  np.testing.assert_array_equal(np.asarray(got[-1]), last)
  diffs = {}
  # Each item alone, unpadded, in transformers == its valid frames in our padded batch.
  for b, (n, f) in enumerate(zip(LENGTHS, frames)):
    out = _run_ref(ref, values[b:b + 1, :n], output_hidden_states=True)
    assert out.last_hidden_state.shape[1] == f
    diffs[f'item{b}'] = _max_diff(last[b, :f], out.last_hidden_state[0])
    # transformers v5 records each layer's input/output; its last entry of a pre-LN model is
    # before the final LayerNorm, ours (like v4) is the last hidden state itself.
    n_cmp = len(got) if not cfg.do_stable_layer_norm else len(got) - 1
    for i in range(n_cmp):
      diffs[f'item{b}_hidden{i}'] = _max_diff(np.asarray(got[i])[b, :f], out.hidden_states[i][0])
  if variant == 'layer':
    # Layer-norm features: transformers' padded batch with the mask is the same thing.
    out = _run_ref(ref, values, mask)
    valid = np.asarray(ours.frame_mask(jnp.asarray(mask)))
    diffs['batch_masked'] = _max_diff(last[valid], out.last_hidden_state.numpy()[valid])
  # Without a mask, every frame (padding included) equals transformers' on the same batch.
  out = _run_ref(ref, values)
  diffs['batch_unmasked'] = _max_diff(ours(jnp.asarray(values)), out.last_hidden_state)
  print(f'\n{variant}: max abs diffs {diffs}')
  assert max(diffs.values()) < TOL, f'{variant}: max abs diffs {diffs}'


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_utterance_features_are_masked_means(saved, variant):
  folder, ref = saved[variant]
  cfg, ours = w2v.load_hf_checkpoint(folder)
  values, mask = padded_batch()
  got = np.asarray(ours.utterance_features(jnp.asarray(values), jnp.asarray(mask)))
  assert got.shape == (len(LENGTHS), cfg.hidden_size) and got.dtype == np.float32
  want = np.stack([_run_ref(ref, values[b:b + 1, :n]).last_hidden_state[0].mean(0).numpy()
                   for b, n in enumerate(LENGTHS)])
  diff = _max_diff(got, want)
  print(f'\n{variant}: utterance feature max abs diff {diff:.3g}')
  assert diff < TOL, f'{variant}: utterance feature max abs diff {diff}'
  hidden = ours(jnp.asarray(values), jnp.asarray(mask))
  pooled = w2v.mean_pool(hidden, ours.frame_mask(jnp.asarray(mask)))
  np.testing.assert_allclose(np.asarray(pooled), got, atol=1e-5)
  # A waveform without a valid sample (or frame) gives finite features, not NaN.
  empty = mask.copy()
  empty[1] = 0
  empty[2, 300:] = 0
  pooled_empty = ours.utterance_features(jnp.asarray(values), jnp.asarray(empty))
  assert np.isfinite(np.asarray(pooled_empty)).all()
  # No mask: a plain mean over all frames.
  np.testing.assert_allclose(np.asarray(w2v.mean_pool(hidden)), np.asarray(hidden).mean(1),
                             atol=1e-5)


def test_feature_lengths_match_transformers(saved):
  folder, ref = saved['group']
  cfg, ours = w2v.load_hf_checkpoint(folder)
  lengths = np.array([cfg.receptive_field, cfg.receptive_field + 1, 399, 400, 401, 1234, 1700,
                      2900, 4000, 16000])
  want = ref._get_feat_extract_output_lengths(torch.tensor(lengths)).numpy()
  np.testing.assert_array_equal(w2v.feature_lengths(cfg, lengths), want)
  np.testing.assert_array_equal(np.asarray(w2v.feature_lengths(cfg, jnp.asarray(lengths))), want)
  assert w2v.feature_lengths(cfg, 4000) == int(want[-2]) == ours.num_frames(4000)
  _, mask = padded_batch()
  ref_mask = ref._get_feature_vector_attention_mask(ours.num_frames(mask.shape[1]),
                                                    torch.tensor(mask)).numpy()
  np.testing.assert_array_equal(np.asarray(ours.frame_mask(jnp.asarray(mask))), ref_mask)


def _write(folder, config_text, tensors):
  folder.mkdir(exist_ok=True)
  (folder / 'config.json').write_text(config_text)
  save_file(tensors, str(folder / 'model.safetensors'))
  return str(folder)


def test_loader_failure_modes(saved, tmp_path):
  folder, _ = saved['layer']
  tensors = load_file(os.path.join(folder, 'model.safetensors'))
  config_text = open(os.path.join(folder, 'config.json')).read()
  with pytest.raises(hf_checkpoint.CheckpointError, match='no config.json'):
    w2v.load_hf_checkpoint(str(tmp_path))
  broken = tmp_path / 'broken'
  name = 'encoder.layers.1.feed_forward.output_dense.weight'
  _write(broken, config_text, {k: v for k, v in tensors.items() if k != name})
  with pytest.raises(hf_checkpoint.CheckpointError, match=f"missing tensor '{name}'"):
    w2v.load_hf_checkpoint(str(broken))
  # Half of the weight-norm pair.
  v_name = 'encoder.pos_conv_embed.conv.parametrizations.weight.original1'
  _write(broken, config_text, {k: v for k, v in tensors.items() if k != v_name})
  with pytest.raises(hf_checkpoint.CheckpointError, match=f"missing tensor '{v_name}'"):
    w2v.load_hf_checkpoint(str(broken))
  _write(broken, config_text, {**tensors, 'feature_projection.projection.weight':
                               np.zeros((5, 16), np.float32)})
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=r"'feature_projection.projection.weight' has shape \[5, 16\]"):
    w2v.load_hf_checkpoint(str(broken))
  _write(broken, config_text, {**tensors, 'encoder.pos_conv_embed.conv.parametrizations.weight.'
                               'original0': np.ones((1, 1, 3), np.float32)})
  with pytest.raises(hf_checkpoint.CheckpointError, match=r'original0.* has shape \[1, 1, 3\]'):
    w2v.load_hf_checkpoint(str(broken))
  _write(broken, config_text, {**tensors, 'encoder.layers.9.adapter.weight':
                               np.zeros(3, np.float32)})
  with pytest.raises(hf_checkpoint.CheckpointError, match=r"unexpected tensors \['encoder.layers.9.adapter"):
    w2v.load_hf_checkpoint(str(broken))
  # No weights; unsupported settings name themselves.
  os.remove(broken / 'model.safetensors')
  with pytest.raises(hf_checkpoint.CheckpointError, match='no model.safetensors'):
    w2v.load_hf_checkpoint(str(broken))
  config = json.loads(config_text)
  for change, message in (({'model_type': 'hubert'}, "model_type 'hubert' is not supported"),
                          ({'feat_extract_norm': 'batch'}, "feat_extract_norm 'batch'"),
                          ({'add_adapter': True}, 'add_adapter=True is not supported'),
                          ({'adapter_attn_dim': 16}, 'adapter_attn_dim=16 is not supported')):
    (broken / 'config.json').write_text(json.dumps({**config, **change}))
    with pytest.raises(hf_checkpoint.CheckpointError, match=message):
      w2v.load_hf_checkpoint(str(broken))
  with pytest.raises(ValueError, match='feat_extract_activation'):
    w2v.Wav2Vec2Config.from_hf({**config, 'feat_extract_activation': 'swish'})


def test_old_weight_norm_names_and_prefixed_head_checkpoints(saved, tmp_path):
  folder, base = saved['group']
  values, mask = padded_batch()
  _, ours = w2v.load_hf_checkpoint(folder)
  want = np.asarray(ours(jnp.asarray(values), jnp.asarray(mask)))
  # weight_g / weight_v (torch.nn.utils.weight_norm) instead of parametrizations.
  tensors = load_file(os.path.join(folder, 'model.safetensors'))
  old = {k.replace('parametrizations.weight.original0', 'weight_g')
         .replace('parametrizations.weight.original1', 'weight_v'): v for k, v in tensors.items()}
  assert 'encoder.pos_conv_embed.conv.weight_g' in old
  renamed = _write(tmp_path / 'old', open(os.path.join(folder, 'config.json')).read(), old)
  _, model = w2v.load_hf_checkpoint(renamed)
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(values), jnp.asarray(mask))), want)
  # A sequence-classification checkpoint: encoder under `wav2vec2.`, heads ignored.
  torch.manual_seed(0)
  clf = transformers.Wav2Vec2ForSequenceClassification(_tiny_config('group'))
  clf.wav2vec2.load_state_dict(base.state_dict())
  clf.eval()
  clf.save_pretrained(tmp_path / 'clf', safe_serialization=True)
  names = load_file(str(tmp_path / 'clf' / 'model.safetensors'))
  assert any(k.startswith('wav2vec2.') for k in names) and 'classifier.weight' in names
  _, model = w2v.load_hf_checkpoint(str(tmp_path / 'clf'))
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(values), jnp.asarray(mask))), want)
  ignored = w2v.load_weights(model, names, 'clf')
  assert ignored and all(k.startswith(('classifier.', 'projector.', 'wav2vec2.masked_spec_embed'))
                         for k in ignored)


def test_jit_compiles_once(saved):
  folder, _ = saved['layer']
  _, model = w2v.load_hf_checkpoint(folder)
  values, mask = padded_batch()
  traces = []

  @nnx.jit
  def forward(model, values, mask):
    traces.append(values.shape)
    return model(values, mask)

  first = forward(model, jnp.asarray(values), jnp.asarray(mask))
  second = forward(model, jnp.asarray(values[::-1].copy()), jnp.asarray(mask[::-1].copy()))
  assert len(traces) == 1
  np.testing.assert_allclose(np.asarray(first), np.asarray(model(values, mask)), atol=1e-5)
  np.testing.assert_allclose(np.asarray(second)[::-1], np.asarray(first), atol=1e-5)


def test_bfloat16_compute_and_seeded_dropout(saved):
  folder, _ = saved['group']
  values, mask = padded_batch()
  _, f32 = w2v.load_hf_checkpoint(folder)
  _, bf16 = w2v.load_hf_checkpoint(folder, dtype=jnp.bfloat16)
  # Traced, not compiled (a bf16 compile costs seconds; measured once: max |diff| ~0.05 on
  # outputs of mean |x| ~0.8): bf16 compute, f32 parameters and output.
  out = nnx.eval_shape(lambda model: model(values, mask), bf16)
  assert out.dtype == jnp.float32 and out.shape == (len(LENGTHS), f32.num_frames(values.shape[1]),
                                                     32)
  assert bf16.layers[0].attention.query.dtype == jnp.bfloat16
  assert bf16.layers[0].attention.query.kernel.dtype == jnp.float32
  # The loader builds the model abstractly: its dropout streams still get concrete, distinct keys.
  keys = [np.asarray(jax.random.key_data(v.get_value()))
          for _, v in nnx.to_flat_state(nnx.state(f32, nnx.RngKey))]
  assert len(keys) == 8 and len({k.tobytes() for k in keys}) == 8
  dropout = f32.layers[0].dropout
  np.testing.assert_array_equal(np.asarray(dropout(jnp.ones(64), deterministic=True)), 1.0)
  dropped = np.asarray(dropout(jnp.ones(64), deterministic=False))
  assert 0 < (dropped == 0).sum() < 64


def test_too_short_waveform_is_an_error(saved):
  _, ours = w2v.load_hf_checkpoint(saved['group'][0])
  with pytest.raises(ValueError, match='fewer than'):
    ours(jnp.zeros((1, ours.config.receptive_field - 1)))
