r"""Writes a shard folder from the field's feature pickles or from tables.

  python -m mer_jax.ingest dialoguernn --input IEMOCAP_features.pkl --out /data/iemocap_shards
  python -m mer_jax.ingest cosmic --input meld_features_roberta.pkl \
      --audio_visual_from MELD_features_raw1.pkl --out /data/meld_cosmic_shards
  python -m mer_jax.ingest tables --input index.csv --features t=text.npy --features a=audio.npz \
      --id_column utt_id --out /data/my_shards

Then train with the feature widths and labels read from the manifest:

  python -m mer_jax.main --config configs/iemocap.py:shards=/data/iemocap_shards --workdir W

See docs/ingest.md for each format.
"""

from __future__ import annotations

from absl import flags

from mer_jax import cli
from mer_jax import ingest
from mer_jax.ingest import cosmic

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('input', None, 'The pickle (dialoguernn, cosmic) or index CSV (tables).')
  flags.DEFINE_string('out', None, 'The shard folder to write.')
  flags.DEFINE_bool('overwrite', False, 'Replace what is at --out.')
  flags.DEFINE_integer('num_shards', 1, 'ArrayRecord files per split.', lower_bound=1)
  flags.DEFINE_enum('dataset', 'auto', ['auto', 'iemocap', 'meld'],
                    'dialoguernn, cosmic: the layout (auto: told by the item count).')
  flags.DEFINE_float('dev_fraction', 0.1, 'Where the source has no dev split: the fraction of '
                     'train dialogues moved to dev.')
  flags.DEFINE_integer('dev_seed', 0, 'Seed of the dev carve-out (--dev_pick=random).')
  flags.DEFINE_enum('dev_pick', 'random', ['random', 'head'], 'random: a seeded choice of whole '
                    "dialogues; head: the first ones in the source's order (MMGCN's validation).")
  flags.DEFINE_enum('text_layers', 'mean', list(cosmic.TEXT_LAYERS),
                    'cosmic: how the four RoBERTa layers make the text feature.')
  flags.DEFINE_string('audio_visual_from', '', 'cosmic: a dialoguernn pickle of the same dataset '
                      'whose audio and visual features join the text.')
  flags.DEFINE_multi_string('features', [], 'tables: MODALITY=PATH (t, a or v; .npy, .npz or '
                            '.csv), once per modality.')
  flags.DEFINE_list('dialogue_column', ['dialogue'],
                    'tables: the column(s) that identify a dialogue.')
  flags.DEFINE_string('utterance_column', 'utterance',
                      'tables: the utterance order column (integers).')
  flags.DEFINE_string('speaker_column', 'speaker', 'tables: speaker column.')
  flags.DEFINE_string('label_column', 'label', 'tables: label column (class names).')
  flags.DEFINE_string('split_column', 'split', 'tables: split column (train, dev/valid, test).')
  flags.DEFINE_string('text_column', 'text', 'tables: transcript column (optional).')
  flags.DEFINE_string('id_column', '', 'tables: the column whose ids key the rows of keyed '
                      'feature files; empty: rows aligned with the index.')
  flags.DEFINE_list('label_names', [], 'tables: the classes in order (default: the labels found, '
                    'sorted).')
  flags.DEFINE_enum('missing', 'error', ['error', 'absent'],
                    'tables: an utterance without features is an error, or absent.')
  flags.mark_flags_as_required(['input', 'out'])


_MELD_LABELS = ('neutral', 'surprise', 'fear', 'sadness', 'joy', 'disgust', 'anger')


def _feature_files(specs: list[str]) -> dict[str, str]:
  out = {}
  for spec in specs:
    modality, sep, path = spec.partition('=')
    if not sep or not path or modality in out:
      raise ingest.IngestError(f'--features {spec!r}: expected MODALITY=PATH, once per modality')
    out[modality] = path
  return out


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise ingest.IngestError(f'give one FORMAT ({", ".join(ingest.FORMATS)}) before the flags; '
                             f'got {argv[1:]}')
  columns = ingest.Columns(
      dialogue=tuple(FLAGS.dialogue_column), utterance=FLAGS.utterance_column,
      speaker=FLAGS.speaker_column, label=FLAGS.label_column, split=FLAGS.split_column,
      text=FLAGS.text_column, id=FLAGS.id_column)
  manifest = ingest.ingest(
      argv[1], FLAGS.input, FLAGS.out,
      dev=ingest.DevCarveOut(FLAGS.dev_fraction, FLAGS.dev_seed, FLAGS.dev_pick),
      num_shards=FLAGS.num_shards, overwrite=FLAGS.overwrite, dataset=FLAGS.dataset,
      text_layers=FLAGS.text_layers, audio_visual_from=FLAGS.audio_visual_from or None,
      features=_feature_files(FLAGS.features), columns=columns,
      label_names=FLAGS.label_names or None, missing=FLAGS.missing)
  for name, split in manifest.splits.items():
    print(f'{name}: {split.num_dialogues} dialogue(s), {split.num_utterances} utterance(s)')
  print(f'wrote {FLAGS.out}: features {manifest.dims}, labels {list(manifest.label_names)}')
  config = 'meld' if manifest.label_names == _MELD_LABELS else 'iemocap'
  print(f'to train: python -m mer_jax.main --config configs/{config}.py:shards={FLAGS.out} '
        '--workdir WORKDIR')


def run(argv=None) -> None:
  """What `python -m mer_jax.ingest` runs (and a console script may)."""
  cli.run_absl(main, doc=__doc__, define_flags=define_flags, argv=argv,
               quiet_libraries=True)


if __name__ == '__main__':
  run()
