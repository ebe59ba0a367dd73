"""Adds TFDS's metadata to a shard folder, so TensorFlow Datasets reads its files in place.

  python -m mer_jax.data.tfds_builder --shard_dir DIR [--name NAME]
  (installed: mer-jax-tfds-metadata --shard_dir DIR)

Folders written by `shards.write_shards` have the metadata already (dataset_info.json,
features.json, metadata.json; mer_jax/data/tfds_metadata.py); this command adds it to a folder
written before. Either way, with no copy and without TensorFlow:

  builder = tfds.builder_from_directory(DIR)   # the dataset `mer_dialogues`
  builder.as_data_source()['train'][i]

Examples are dicts of numpy arrays, bytes for text (`record_from_example` makes a DialogueRecord
of one); `DialogueFeatures` decodes the folder's msgpack records and validates each as
`DialogueShardSource` does. TFDS reads a split file by file, while DialogueShardSource deals the
records round-robin over the files: with one file per split the orders agree, otherwise
`tfds_order` maps one to the other. Label names, modalities and dims are in `info.metadata`.

`prepare(shard_dir, data_dir)` instead writes a TFDS copy in its own format (`tf.train.Example`
records, shuffling disabled so that example `i` is record `i` of the shard source): a dataset
that reads without mer_jax and also with `as_dataset` (tf.data, which needs TensorFlow).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from typing import Any, Iterator, Mapping, Sequence

from absl import flags
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mer_jax import cli
from mer_jax.data import shards
from mer_jax.data import tfds_metadata

_VERSION = tfds_metadata.VERSION
FLAGS = flags.FLAGS


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
  return tfds.features.FeaturesDict(_feature_spec(dims))


def _feature_spec(dims: Mapping[str, int]) -> dict[str, Any]:
  tensor = tfds.features.Tensor
  return {
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
  }


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


def numpy_example(record: shards.DialogueRecord) -> dict[str, Any]:
  """A record as TFDS's numpy decoding gives it for `dialogue_features`: bytes for text, keys
  in sorted order."""
  example = example_from_record(record)
  example['dialogue_id'] = record.dialogue_id.encode()
  for key in ('speakers', 'transcripts'):
    example[key] = [text.encode() for text in example[key]]

  def sort_keys(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: sort_keys(v) if isinstance(v, dict) else v for k, v in sorted(tree.items())}

  return sort_keys(example)


class DialogueFeatures(tfds.features.FeaturesDict):
  """`dialogue_features(dims)` stored as a shard folder's own msgpack records.

  The features of a shard folder read in place (tfds_metadata.py names this class in
  features.json; TFDS imports it from there). `as_data_source` decodes each record and validates
  it as DialogueShardSource does; tf.data's `as_dataset` would need the records to be
  `tf.train.Example` protos, which `prepare` writes.
  """

  def __init__(self, dims: Mapping[str, int], label_names: Sequence[str]):
    self.dims = dict(dims)
    self.label_names = tuple(label_names)
    super().__init__(_feature_spec(self.dims))

  @classmethod
  def from_json_content(cls, value: Mapping[str, Any]) -> DialogueFeatures:
    return cls(value['dims'], value['label_names'])

  def to_json_content(self) -> dict[str, Any]:
    return {'dims': dict(self.dims), 'label_names': list(self.label_names)}

  def deserialize_example_np(self, serialized_example, *, decoders=None) -> dict[str, Any]:
    if decoders:
      raise ValueError('mer_dialogues read in place takes no decoders')
    record = None
    try:
      record = shards.decode_record(bytes(serialized_example))
      shards.validate_record(record, self.dims, len(self.label_names))
    except ValueError as e:
      where = f' (dialogue_id={record.dialogue_id!r})' if record else ''
      raise shards.BadRecordError(f'bad mer_dialogues record{where}: {e}') from e
    return numpy_example(record)

  def deserialize_example(self, serialized_example, *, decoders=None):
    raise NotImplementedError(
        'a shard folder read in place gives numpy examples only (as_data_source, or '
        'tfds.data_source); for tf.data, prepare a copy with mer_jax.data.tfds_builder.prepare')

  def serialize_example(self, example_data) -> bytes:
    raise NotImplementedError('shard folders are written by mer_jax.data.shards.write_shards')


def tfds_order(manifest: shards.Manifest, split: str) -> np.ndarray:
  """DialogueShardSource's index of each example of `split` read in place through TFDS.

  TFDS reads file 0's records, then file 1's, ...; the writer dealt record `i` to file `i % n`.
  """
  info = manifest.splits[split]
  num_files = len(info.files)
  return np.concatenate([np.arange(k, info.num_dialogues, num_files)
                         for k in range(num_files)])


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


# Run as `python -m`, this file is imported a second time as mer_jax.data.tfds_builder (TFDS
# imports DialogueFeatures by that name), and that copy registers the dataset name.
class MerDialogues(tfds.core.GeneratorBasedBuilder,
                   skip_registration=__name__ == '__main__'):
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
  return tfds_metadata.config_name(epath.Path(shard_dir).name)


def add_metadata(shard_dir: epath.PathLike, *,
                 name: str | None = None) -> tfds.core.DatasetBuilder:
  """Writes TFDS's metadata into a shard folder and returns `tfds.builder_from_directory` of it.

  For folders written before `write_shards` wrote the metadata itself; rewriting it is harmless.
  The folder is checked first as DialogueShardSource opens it (its files present, with the sizes
  and record counts of the manifest), but not hashed. The manifest and the data files are left
  as they are.
  """
  shard_dir = epath.Path(shard_dir)
  manifest = shards.load_manifest(shard_dir)
  for split in manifest.splits:
    shards.DialogueShardSource(shard_dir, split, verify_checksums=False)
  try:
    tfds_metadata.write_metadata(shard_dir, (shard_dir / shards.MANIFEST_NAME).read_text(),
                                 name=name or config_name(shard_dir))
  except ValueError as e:
    raise shards.ShardError(f'{shard_dir}: {e}') from e
  return tfds.builder_from_directory(shard_dir)


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


def define_flags() -> None:
  flags.DEFINE_string('shard_dir', None, 'A shard folder: manifest.json and its ArrayRecord files.')
  flags.DEFINE_string('name', None, "The dataset's TFDS config name; default: the folder's name, "
                      'lower case, [a-z0-9_].')
  flags.mark_flag_as_required('shard_dir')


def main(argv):
  del argv
  builder = add_metadata(FLAGS.shard_dir, name=FLAGS.name)
  counts = ', '.join(f'{split} {info.num_examples}' for split, info in builder.info.splits.items())
  print(f'{FLAGS.shard_dir}: TFDS metadata written ({counts} dialogues); read it in place with '
        f'tfds.builder_from_directory({FLAGS.shard_dir!r})', file=sys.stderr)


def run(argv=None) -> None:
  """The `mer-jax-tfds-metadata` console script."""
  cli.run_absl(main, doc=__doc__, define_flags=define_flags, argv=argv,
               quiet_libraries=True)


if __name__ == '__main__':
  run()
