"""The dialogue GRU: parity with torch.nn.GRU, resets between packed dialogues, the teacher."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mer_jax.run import job
from mer_jax.run import corpus
from mer_jax import predict
from mer_jax.config_validation import ConfigError
from mer_jax.config_validation import validate_config
from mer_jax.data import shards
from mer_jax.models import sequence
from tests import test_encoders

pytestmark = pytest.mark.slow

D, H = 12, 5  # test_encoders' text width, a GRU width


def gru_and_torch_twin(seed=0, projection=0):
  """A DialogueBiGRU with random biases and torch's bidirectional GRU holding its weights
  (the twin reads the projected input when there is a projection)."""
  torch = pytest.importorskip('torch')
  model = sequence.DialogueBiGRU(D, H, projection=projection, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  model.input_bias[...] = jnp.asarray(rng.normal(size=(2, 3 * H)), jnp.float32)
  model.recurrent_bias[...] = jnp.asarray(rng.normal(size=(2, 3 * H)), jnp.float32)
  twin = torch.nn.GRU(projection or D, H, batch_first=True, bidirectional=True)
  with torch.no_grad():
    for k, suffix in enumerate(('', '_reverse')):
      getattr(twin, 'weight_ih_l0' + suffix).copy_(
          torch.from_numpy(np.asarray(model.input_kernel[k]).T.copy()))
      getattr(twin, 'weight_hh_l0' + suffix).copy_(
          torch.from_numpy(np.asarray(model.recurrent_kernel[k]).T.copy()))
      getattr(twin, 'bias_ih_l0' + suffix).copy_(torch.from_numpy(np.array(model.input_bias[k])))
      getattr(twin, 'bias_hh_l0' + suffix).copy_(
          torch.from_numpy(np.array(model.recurrent_bias[k])))
  return model, twin


def torch_states(twin, x):
  torch = pytest.importorskip('torch')
  with torch.no_grad():
    out, _ = twin(torch.from_numpy(np.asarray(x))[None])
  return out[0].numpy()


def test_starts_and_ends_of_packed_dialogues():
  rng = np.random.default_rng(0)
  batch = test_encoders.pad([test_encoders.dialogue(rng, 3), test_encoders.dialogue(rng, 2)],
                            8, 40, 3)
  starts, ends = sequence.dialogue_starts_and_ends(batch)
  # Nodes 0-2, 3-4, then the padding graph's 5-7.
  np.testing.assert_array_equal(starts, [1, 0, 0, 1, 0, 1, 0, 0])
  np.testing.assert_array_equal(ends, [0, 0, 1, 0, 1, 0, 0, 1])


def test_each_packed_dialogue_matches_torch_gru_run_on_it_alone():
  rng = np.random.default_rng(1)
  lengths = (5, 1, 4)
  batch = test_encoders.pad([test_encoders.dialogue(rng, n) for n in lengths], 14, 60, 4)
  x = np.array(batch.nodes['features']['t'])
  x[sum(lengths):] = rng.normal(size=(14 - sum(lengths), D))  # padding must not leak in
  model, twin = gru_and_torch_twin()
  out = np.asarray(jax.jit(lambda m, x, g: m(x, g))(model, jnp.asarray(x), batch))
  assert out.shape == (14, 2 * H)
  start = 0
  for n in lengths:
    np.testing.assert_allclose(out[start:start + n], torch_states(twin, x[start:start + n]),
                               rtol=1e-5, atol=1e-5)
    start += n


def test_projected_gru_reads_relu_of_the_projection():
  rng = np.random.default_rng(3)
  lengths = (4, 3)
  batch = test_encoders.pad([test_encoders.dialogue(rng, n) for n in lengths], 8, 40, 3)
  x = np.asarray(batch.nodes['features']['t'])
  model, twin = gru_and_torch_twin(seed=1, projection=7)
  projected = np.maximum(
      x @ np.asarray(model.projection.kernel[...]) + np.asarray(model.projection.bias[...]), 0.0)
  out = np.asarray(model(jnp.asarray(x), batch))
  np.testing.assert_allclose(out[:4], torch_states(twin, projected[:4]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[4:7], torch_states(twin, projected[4:7]), rtol=1e-5, atol=1e-5)


def test_teacher_with_the_gru_reads_the_turns_in_order():
  """Reversing a dialogue's turns changes the teacher's output only through the GRU."""
  rng = np.random.default_rng(2)
  one = test_encoders.dialogue(rng, 5)
  flipped = jax.tree.map(lambda a: a, one)
  flipped.nodes['features']['t'] = one.nodes['features']['t'][::-1].copy()
  config = test_encoders.tiny_config()
  config.graph.speaker_edges = False  # temporal edges are symmetric: the graph is order-blind
  config.graph.temporal_weight.t = 0.0
  outputs = {}
  for gru in (0, 4):
    config.model.teacher.context_gru = gru
    model = test_encoders.build('teacher', config)
    outputs[gru] = [np.asarray(test_encoders.run(
        model, 'teacher', test_encoders.pad([d], 8, 40, 2), False)[0][:5])
                    for d in (one, flipped)]
  np.testing.assert_allclose(outputs[0][1][::-1], outputs[0][0], rtol=1e-5, atol=1e-5)
  assert np.abs(outputs[4][1][::-1] - outputs[4][0]).max() > 1e-3


def test_gru_needs_dialogue_scope_graphs():
  config = default.get_config('tiny')
  config.model.teacher.context_gru = 8
  validate_config(config)
  config.graph.scope = 'batch'
  with pytest.raises(ConfigError, match=r"model\.teacher\.context_gru: .*graph\.scope='dialogue'"):
    validate_config(config)
  config.graph.scope = 'dialogue'
  config.model.teacher.context_gru = -1
  with pytest.raises(ConfigError, match=r'model\.teacher\.context_gru: -1 must be an int >= 0'):
    validate_config(config)
  config.model.teacher.context_gru = 0
  config.model.teacher.context_projection = 16
  with pytest.raises(ConfigError, match=r'model\.teacher\.context_projection: .*context_gru > 0'):
    validate_config(config)


def test_gru_teacher_without_batchnorm_trains_saves_and_restores(tmp_path):
  """A teacher-only run with both options; the restored best checkpoint reproduces the test
  probabilities written during training."""
  config = default.get_config('tiny')
  config.train.stages = ('teacher',)
  config.model.teacher.context_gru = 6
  config.model.teacher.context_projection = 5
  config.model.teacher.input_batchnorm = False
  config.mesh.shape = {'data': 1, 'model': 1}
  validate_config(config)
  workdir = str(tmp_path / 'w')
  results = job.train_and_evaluate(config, workdir)
  assert 0.0 <= results['teacher']['test_weighted_f1'] <= 1.0
  saved = np.load(f'{workdir}/predictions/teacher_test.npz')
  predictor = predict.Predictor(workdir)
  params, batch_stats, _ = predictor.models['teacher'].states
  assert 'context' in params and not jax.tree.leaves(batch_stats)
  test = shards.DialogueShardSource(corpus.synthetic_dir(config, workdir), 'test')
  records = [test[i] for i in range(len(test))]
  for index, probs in enumerate(predictor.probabilities(records)):
    rows = np.flatnonzero(saved['records'] == index)
    np.testing.assert_allclose(saved['probs'][rows][np.argsort(saved['utterances'][rows])],
                               probs, atol=1e-5)
