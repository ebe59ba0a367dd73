"""The shared Hugging Face loading machinery on a toy module (no torch or transformers needed)."""

import dataclasses
import json
import types

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('safetensors')
from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

from mer_jax.models import hf_checkpoint as hc  # pylint: disable=g-import-not-at-top


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  n_in: int
  n_out: int

  @classmethod
  def from_hf(cls, hf):
    get = hc.config_getter(hf, ('toy',))
    return cls(n_in=int(get('n_in')), n_out=int(get('n_out')))


class Toy(nnx.Module):

  def __init__(self, cfg: ToyConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = cfg
    self.dense = nnx.Linear(cfg.n_in, cfg.n_out, dtype=dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(cfg.n_out, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)


def _names(cfg: ToyConfig) -> hc.NameTable:
  return {**hc.kernel_names('proj', ('dense',)), **hc.norm_names('ln', ('norm',))}


def load_weights(model, tensors, source, **kwargs):
  return hc.load_tensors(model, tensors, source, _names(model.config), what='a toy',
                         canonical=lambda n: n[len('toy.'):] if n.startswith('toy.') else n,
                         ignored_prefixes=('head.',), **kwargs)


def _tensors():
  rng = np.random.default_rng(0)
  return {'toy.proj.weight': rng.normal(size=(3, 2)).astype(np.float32),  # torch [out, in]
          'toy.proj.bias': rng.normal(size=3).astype(np.float32),
          'toy.ln.weight': rng.normal(size=3).astype(np.float32),
          'toy.ln.bias': rng.normal(size=3).astype(np.float32),
          'head.weight': np.zeros(1, np.float32)}


def _folder(tmp_path, tensors=None, config=None):
  (tmp_path / 'config.json').write_text(json.dumps(config or {'model_type': 'toy', 'n_in': 2,
                                                              'n_out': 3}))
  save_file(_tensors() if tensors is None else tensors, str(tmp_path / 'model.safetensors'))
  return str(tmp_path)


@pytest.mark.parametrize('abstract', [True, False])
def test_loads_transposed_and_ignores_heads(tmp_path, abstract):
  tensors = _tensors()
  cfg, model = hc.load_hf_checkpoint(_folder(tmp_path), ToyConfig, Toy, load_weights,
                                     dtype=jnp.float32, seed=0, abstract=abstract)
  assert cfg == ToyConfig(2, 3)
  np.testing.assert_array_equal(np.asarray(model.dense.kernel[...]), tensors['toy.proj.weight'].T)
  np.testing.assert_array_equal(np.asarray(model.norm.bias[...]), tensors['toy.ln.bias'])
  assert load_weights(model, tensors, 'x') == ['head.weight']
  dropped = np.asarray(model.dropout(jnp.ones(64), deterministic=False))  # streams are concrete
  assert 0 < (dropped == 0).sum() < 64


def test_tensor_errors_name_the_entry(tmp_path):
  _, model = hc.load_hf_checkpoint(_folder(tmp_path), ToyConfig, Toy, load_weights,
                                   dtype=jnp.float32, seed=0)
  tensors = _tensors()
  with pytest.raises(hc.CheckpointError, match=r"src: unexpected tensors \['zzz'\] .* for a toy"):
    load_weights(model, {**tensors, 'zzz': np.zeros(1)}, 'src')
  del tensors['toy.ln.bias']
  with pytest.raises(hc.CheckpointError, match=r"src: missing tensor 'ln.bias' \(1 missing"):
    load_weights(model, tensors, 'src')
  with pytest.raises(hc.CheckpointError, match=r'missing tensor <ln.bias> \(1 missing'):
    load_weights(model, tensors, 'src', missing_name=lambda n: f'<{n}>')
  # `combine` makes the missing entry from an extra input.
  load_weights(model, {**tensors, 'toy.ln.b0': np.ones(3, np.float32)}, 'src',
               extra_inputs={'ln.b0'}, combine=lambda f: f.update({'ln.bias': f.pop('ln.b0')}))
  np.testing.assert_array_equal(np.asarray(model.norm.bias[...]), 1.0)
  with pytest.raises(hc.CheckpointError,
                     match=r"'proj.weight' has shape \[2, 3\]; the config needs \[3, 2\]"):
    load_weights(model, {**_tensors(), 'toy.proj.weight': np.zeros((2, 3), np.float32)}, 'src')
  # A table that leaves a parameter out is a bug of the table, not of the checkpoint.
  proj = {k: v for k, v in _tensors().items() if k.startswith('toy.proj.')}
  with pytest.raises(RuntimeError, match=r"no checkpoint tensor maps to the parameters \[\('norm'"):
    hc.load_tensors(model, proj, 'src', hc.kernel_names('toy.proj', ('dense',)), what='x')


def test_folder_and_config_errors_name_the_file(tmp_path):
  with pytest.raises(hc.CheckpointError, match='no config.json'):
    hc.read_hf_folder(str(tmp_path), ToyConfig.from_hf)
  (tmp_path / 'config.json').write_text('{nope')
  with pytest.raises(hc.CheckpointError, match='config.json: not valid JSON'):
    hc.read_hf_folder(str(tmp_path), ToyConfig.from_hf)
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
  with pytest.raises(hc.CheckpointError,
                     match="config.json: model_type 'bert' is not supported; expected 'toy'"):
    hc.read_hf_folder(str(tmp_path), ToyConfig.from_hf)
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'toy', 'n_in': 2}))
  with pytest.raises(hc.CheckpointError, match='config.json: .*NoneType'):
    hc.read_hf_folder(str(tmp_path), ToyConfig.from_hf)
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'toy', 'n_in': 2, 'n_out': 3}))
  with pytest.raises(hc.CheckpointError, match='no model.safetensors'):
    hc.read_hf_folder(str(tmp_path), ToyConfig.from_hf)


def test_config_getter_reads_dicts_and_objects():
  get = hc.config_getter(types.SimpleNamespace(model_type='b', x=1), ('a', 'b'))
  assert get('x') == 1 and get('y', 2) == 2
  with pytest.raises(ValueError, match=r"model_type 'c' is not supported; expected one of "
                     r"\('a', 'b'\)"):
    hc.config_getter({'model_type': 'c'}, ('a', 'b'))
