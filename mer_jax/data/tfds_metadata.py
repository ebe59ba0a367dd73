"""TFDS metadata beside a shard folder's files, so `tfds.builder_from_directory(shard_dir)` reads
the ArrayRecord files where they are, with no copy.

TFDS knows a prepared dataset from three files in its folder: `dataset_info.json` (name, version,
file format and, per split, the records of each file and a template that names the files),
`features.json` (what an example is) and `metadata.json` (free-form). Each split's template is
`{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}`, which names files exactly as `shards.shard_file_name` does
(`train-00000-of-00002.array_record`), so the files keep their names. The features are
`tfds_builder.DialogueFeatures`: TFDS imports that class by the name in `features.json` when it
opens the folder, and it decodes our msgpack records (TFDS's own features would parse them as
`tf.train.Example` protos).

The files are written as plain JSON, without importing TFDS: `shards.write_shards` writes them
into every new folder, and its callers (training, ingest) should not pay for importing TFDS.
tests/test_tfds_builder.py checks them against what the installed TFDS writes and reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from etils import epath

NAME = 'mer_dialogues'
VERSION = '1.0.0'
FILE_FORMAT = 'array_record'
FILEPATH_TEMPLATE = '{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}'
FEATURES_CLASS = 'mer_jax.data.tfds_builder.DialogueFeatures'
DATASET_INFO_NAME = 'dataset_info.json'
FEATURES_NAME = 'features.json'
METADATA_NAME = 'metadata.json'
FILE_NAMES = (DATASET_INFO_NAME, FEATURES_NAME, METADATA_NAME)


def tfds_file_name(split: str, index: int, num_files: int) -> str:
  """The name FILEPATH_TEMPLATE gives file `index` of a split (TFDS pads to 5 digits or more)."""
  digits = max(len(str(num_files)), 5)
  return f'{split}-{index:0{digits}d}-of-{num_files:0{digits}d}.{FILE_FORMAT}'


def features_json(dims: dict[str, int], label_names: list[str]) -> dict[str, Any]:
  """features.json of `DialogueFeatures(dims, label_names)`, as TFDS's `save_config` writes it."""
  content = {'dims': dict(dims), 'label_names': list(label_names)}
  return {'pythonClassName': FEATURES_CLASS, 'jsonFeature': {'json': json.dumps(content)}}


def config_name(folder_name: str) -> str:
  """A TFDS config name from a folder's name: lower case, [a-z0-9_]."""
  return re.sub(r'[^a-z0-9_]', '_', folder_name.lower())


def write_metadata(folder: epath.PathLike, manifest_text: str, *, name: str) -> None:
  """Writes the TFDS metadata of the shard folder whose manifest.json holds `manifest_text`.

  `name` is the TFDS config name (shard folders are written under a temporary name first).
  dataset_info.json is written last: TFDS sees no dataset until every file is there.

  Raises:
    ValueError: a split's file names differ from the template's (not written by write_shards).
  """
  folder = epath.Path(folder)
  manifest = json.loads(manifest_text)
  splits = []
  for split, info in manifest['splits'].items():
    names = [f['name'] for f in info['files']]
    expected = [tfds_file_name(split, i, len(names)) for i in range(len(names))]
    if names != expected:
      raise ValueError(f'split {split!r}: files {names} are not named {FILEPATH_TEMPLATE} '
                       f'({expected}), so TFDS cannot find them')
    splits.append({'name': split, 'filepathTemplate': FILEPATH_TEMPLATE,
                   'shardLengths': [f['num_records'] for f in info['files']],
                   'numBytes': sum(f['size'] for f in info['files'])})
  dims, label_names = manifest['dims'], manifest['label_names']
  dataset_info = {
      'name': NAME, 'version': VERSION, 'configName': name,
      'moduleName': FEATURES_CLASS.rpartition('.')[0],
      'description': (f'Dialogues of the mer_jax shard folder {name!r}, read in place: labels '
                      f'{label_names} (-1 = unlabeled), modalities {dims}. TFDS reads a split '
                      "file by file; mer_jax's DialogueShardSource reads it round-robin."),
      'fileFormat': FILE_FORMAT,
      'disableShuffling': True,
      'splits': splits,
  }
  metadata = {'label_names': label_names, 'modalities': manifest['modalities'], 'dims': dims,
              'shard_format': manifest['format'],
              'manifest_sha256': hashlib.sha256(manifest_text.encode()).hexdigest()}
  (folder / FEATURES_NAME).write_text(
      json.dumps(features_json(dims, label_names), indent=4, sort_keys=True))
  (folder / METADATA_NAME).write_text(json.dumps(metadata))
  (folder / DATASET_INFO_NAME).write_text(json.dumps(dataset_info, indent=2))
