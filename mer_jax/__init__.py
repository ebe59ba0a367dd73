"""mer_jax: multimodal emotion recognition in conversation with JAX and Flax.

  model = mer_jax.load('path/to/workdir_or_bundle')
  rows = model.predict([{'dialogue_id': 'd1', 'utterances': [{'speaker': 'Ann', 'text': 'Hi!'}]}])

docs/predict_api.md describes the input, the rows and the bundles `python -m mer_jax.export`
writes.
"""


def load(path: str, checkpoint_dir: str = ''):
  """The model of a trained workdir (mer_jax.main) or a bundle (mer_jax.export), ready to label
  dialogues: a mer_jax.predict.Predictor; see its `predict`."""
  # Here, not at the top: `import mer_jax` (which every submodule's import runs) stays free of JAX.
  from mer_jax import predict  # pylint: disable=g-import-not-at-top
  return predict.load(path, checkpoint_dir=checkpoint_dir)
