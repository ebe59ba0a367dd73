"""A shard folder as the TensorFlow Datasets dataset `mer_dialogues`.

TFDS 4.9.10 prepares and reads `array_record` datasets without TensorFlow:
`download_and_prepare()` serializes examples with its own protobuf code and
`as_data_source()` / `tfds.data_source()` give random access through
ArrayRecord. So the builder is an ordinary `GeneratorBasedBuilder` whose
`_generate_examples` reads `DialogueShardSource`; each shard folder becomes a
builder config (named after the folder unless told otherwise). Shuffling is
disabled, so example `i` of a split is record `i` of the shard source.

Once prepared, the dataset is readable without this module and without the
shard folder:

  tfds.data_source('mer_dialogues/NAME', data_dir=DATA_DIR)['train'][i]
  tfds.builder_from_directory(DATA_DIR/mer_dialogues/NAME/1.0.0)

Examples hold bytes for text fields; `record_from_example` turns one back
into a `DialogueRecord`. Label names, modalities and dims are in
`info.metadata`, along with the sha256 of the source manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Iterator, Mapping

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mer_jax.data import shards

_VERSION = '1.0.0'


@dataclasses.dataclass
class ShardFolderConfig(tfds.core.BuilderConfig):
  """One shard folder; `on_bad_record` as in `DialogueShardSource`."""

  shard_dir: str = ''
  on_bad_record: str = 'error'


def _manifest_sha256(shard_dir: epath.PathLike) -> str:
  path = epath.Path(shard_dir) / shards.MANIFEST_NAME
  return hashlib.sha256(path.read_bytes()).hexdigest()


def dialogue_features(dims: Mapping[str, int]) -> tfds.features.FeaturesDict:
  """The TFDS feature spec of one dialogue with these modality dims."""
  tensor = tfds.features.Tensor
  return tfds.features.FeaturesDict({
      'dialogue_id': tfds.features.Text(),
      'utterance_ids': tensor(shape=(None,), dtype=np.int32),
      'speakers': tfds.features.Sequence(tfds.features.Text()),
      'speaker_ids': tensor(shape=(None,), dtype=np.int32),
      'labels': tensor(shape=(None,), dtype=np.int32),
      'transcripts': tfds.features.Sequence(tfds.features.Text()),
      'features': {m: tensor(shape=(None, d), dtype=np.float32,
                             encoding=tfds.features.Encoding.BYTES)
                   for m, d in dims.items()},
      'present': {m: tensor(shape=(None,), dtype=np.bool_) for m in dims},
  })


def example_from_record(record: shards.DialogueRecord) -> dict[str, Any]:
  return {
      'dialogue_id': record.dialogue_id,
      'utterance_ids': record.utterance_ids,
      'speakers': list(record.speakers),
      'speaker_ids': record.speaker_ids,
      'labels': record.labels,
      'transcripts': list(record.transcripts),
      'features': dict(record.features),
      'present': dict(record.present),
  }


def record_from_example(example: Mapping[str, Any]) -> shards.DialogueRecord:
  """Converts a decoded TFDS example (bytes for text) to a DialogueRecord."""

  def text(value: Any) -> str:
    return value.decode('utf-8') if isinstance(value, bytes) else str(value)

  return shards.DialogueRecord(
      dialogue_id=text(example['dialogue_id']),
      utterance_ids=np.asarray(example['utterance_ids'], np.int32),
      speakers=[text(s) for s in example['speakers']],
      speaker_ids=np.asarray(example['speaker_ids'], np.int32),
      labels=np.asarray(example['labels'], np.int32),
      transcripts=[text(s) for s in example['transcripts']],
      features={m: np.asarray(x, np.float32)
                for m, x in example['features'].items()},
      present={m: np.asarray(x, np.bool_)
               for m, x in example['present'].items()},
  )


class MerDialogues(tfds.core.GeneratorBasedBuilder):
  """Dialogues with per-utterance labels and text/audio/visual features."""

  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: 'Dialogues read from a mer_jax shard folder.'}
  # TFDS derives `code_path` through `importlib_resources`, which it only
  # declares for Python < 3.9 (tensorflow/datasets#11212); naming the file here
  # avoids that lookup.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str = 'array_record', **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _manifest(self) -> shards.Manifest:
    config = self.builder_config
    if not isinstance(config, ShardFolderConfig) or not config.shard_dir:
      raise ValueError(
          'mer_dialogues needs a ShardFolderConfig with a shard_dir (use '
          'mer_jax.data.tfds_builder.prepare); prepared copies are read with '
          "tfds.data_source('mer_dialogues/NAME', data_dir=...)")
    return shards.load_manifest(config.shard_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    manifest = self._manifest()
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            f'Dialogues from the shard folder {self.builder_config.shard_dir}: '
            f'labels {list(manifest.label_names)} (-1 = unlabeled), '
            f'modalities {dict(manifest.dims)}.'),
        features=dialogue_features(manifest.dims),
        disable_shuffling=True,  # keep the shard folder's record order
        metadata=tfds.core.MetadataDict(
            label_names=list(manifest.label_names),
            modalities=list(manifest.modalities),
            dims=dict(manifest.dims),
            shard_dir=self.builder_config.shard_dir,
            manifest_sha256=_manifest_sha256(self.builder_config.shard_dir)),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The shards are local; nothing to download.
    return {split: self._generate_examples(split)
            for split in self._manifest().splits}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    source = shards.DialogueShardSource(
        self.builder_config.shard_dir, split,
        on_bad_record=self.builder_config.on_bad_record)
    for i in range(len(source)):
      yield i, example_from_record(source[i])


def config_name(shard_dir: epath.PathLike) -> str:
  """Default config name: the folder's name in lower case, [a-z0-9_]."""
  return re.sub(r'[^a-z0-9_]', '_', epath.Path(shard_dir).name.lower())


def prepare(shard_dir: epath.PathLike, data_dir: epath.PathLike, *,
            name: str | None = None, on_bad_record: str = 'error',
            overwrite: bool = False) -> MerDialogues:
  """Prepares `mer_dialogues/{name}` in `data_dir` from a shard folder.

  A copy prepared earlier is reused when it was made from the same manifest;
  if the manifest changed since, this raises unless `overwrite` is set, in
  which case the copy is regenerated.

  Returns:
    The prepared builder (`builder.as_data_source()[split][i]`).
  """
  shard_dir = epath.Path(shard_dir).resolve()
  config = ShardFolderConfig(name=name or config_name(shard_dir),
                             shard_dir=str(shard_dir),
                             on_bad_record=on_bad_record)
  builder = MerDialogues(config=config, data_dir=data_dir)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if builder.is_prepared():
    prepared = tfds.builder_from_directory(builder.data_dir)
    if prepared.info.metadata.get('manifest_sha256') != _manifest_sha256(
        shard_dir):
      if not overwrite:
        raise shards.ShardError(
            f'{builder.data_dir} was prepared from a different manifest than '
            f'{shard_dir / shards.MANIFEST_NAME}; pass overwrite=True to '
            'regenerate it')
      mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder
