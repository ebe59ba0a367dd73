"""Shard folders on remote storage (gs://...): a verified local copy for the ArrayRecord reader.

ArrayRecord opens local files only (its riegeli reader has no open-source GCS backend), so a
shard folder given as a gs:// path is copied once, through etils/epath, into the data cache:

* every file the manifest lists is streamed with its size and sha256 checked against the
  manifest, written under a temporary name and renamed when complete, so an interrupted copy
  never leaves a file that looks finished;
* the manifest is written last: a folder with a manifest is a finished copy;
* files already staged with the manifest's size are kept (the shard reader still checks their
  sha256 when data.verify_checksums is on), so a rerun or a second process copies nothing.

Each host of a multi-host run stages into its own local cache.
"""

from __future__ import annotations

import hashlib
import os

from etils import epath

from mer_jax import files
from mer_jax.data import shards

_BLOCK = 1 << 22


def is_remote(path: epath.PathLike) -> bool:
  """True for URLs of a remote file system (gs://, s3://, ...); local paths and file:// are not."""
  path = os.fspath(path)
  return '://' in path and not path.startswith('file://')


def staged_dir(remote_dir: str, cache_root: str) -> str:
  """Where `remote_dir` is copied: one folder per URL under `cache_root`."""
  key = hashlib.sha1(remote_dir.rstrip('/').encode()).hexdigest()[:10]
  return os.path.join(cache_root, f'remote-{key}')


def _copy_verified(src: epath.Path, dst: str, entry: shards.ShardFile) -> None:
  digest, size = hashlib.sha256(), 0
  with files.open_atomically(dst, 'wb') as fout, src.open('rb') as fin:
    for block in iter(lambda: fin.read(_BLOCK), b''):
      digest.update(block)
      size += len(block)
      fout.write(block)
    if size != entry.size:
      raise shards.ShardError(f'{src}: {size} bytes, the manifest says {entry.size}; the remote '
                              'file is truncated or replaced')
    if digest.hexdigest() != entry.sha256:
      raise shards.ShardError(f'{src}: sha256 checksum mismatch with the manifest')


def stage_shards(shard_dir: str, cache_root: str) -> str:
  """A local shard folder with the contents of `shard_dir` (returned as is when it is local)."""
  if not is_remote(shard_dir):
    return shard_dir
  remote = epath.Path(shard_dir)
  remote_manifest = remote / shards.MANIFEST_NAME
  if not remote_manifest.exists():
    raise shards.ShardError(f'manifest not found: {remote_manifest} (incomplete or not a shard '
                            'folder)')
  manifest_text = remote_manifest.read_text()  # the one read of the remote manifest
  local = staged_dir(shard_dir, cache_root)
  local_manifest = os.path.join(local, shards.MANIFEST_NAME)
  if os.path.exists(local_manifest):
    with open(local_manifest, encoding='utf-8') as f:
      if f.read() == manifest_text:
        return local
  manifest = shards.parse_manifest(manifest_text, remote_manifest)
  os.makedirs(local, exist_ok=True)
  for split in manifest.splits.values():
    for entry in split.files:
      dst = os.path.join(local, entry.name)
      if os.path.exists(dst) and os.path.getsize(dst) == entry.size:
        continue
      _copy_verified(remote / entry.name, dst, entry)
  with files.open_atomically(local_manifest, encoding='utf-8') as f:
    f.write(manifest_text)
  return local
