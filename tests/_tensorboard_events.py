"""Reads TensorBoard event files without TensorFlow: TFRecord framing, tensorboardX's protos."""

import collections
import glob
import os
import struct

from tensorboardX.proto import event_pb2
from tensorboardX.proto import plugin_hparams_pb2


def events(logdir: str):
  """Every event of every event file in `logdir` (not its subfolders), file by file."""
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack_from('<Q', data, offset)
      start = offset + 12  # length, then its CRC
      yield event_pb2.Event.FromString(data[start:start + length])
      offset = start + length + 4  # the record's CRC


def scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} in the order written."""
  out = collections.defaultdict(list)
  for event in events(logdir):
    for value in event.summary.value:
      if value.WhichOneof('value') == 'simple_value':
        out[value.tag].append((event.step, value.simple_value))
  return dict(out)


def texts(logdir: str) -> dict[str, list[str]]:
  out = collections.defaultdict(list)
  for event in events(logdir):
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == 'text':
        out[value.tag] += [s.decode() for s in value.tensor.string_val]
  return dict(out)


def hparams(logdir: str) -> list[dict]:
  """The hyperparameters of each HParams session start, as {name: value}."""
  sessions = []
  for event in events(logdir):
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name != 'hparams':
        continue
      data = plugin_hparams_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
      if data.WhichOneof('data') == 'session_start_info':
        sessions.append({name: getattr(v, v.WhichOneof('kind'))
                         for name, v in data.session_start_info.hparams.items()})
  return sessions
