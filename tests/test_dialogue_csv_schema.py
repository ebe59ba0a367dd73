"""Any dialogue CSV: several dialogue columns, labels set once, list-valued speaker cells, and
config files loaded from any working directory (docs/dialogue_csv.md)."""

import collections
import csv
import os
import pathlib
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from configs import iemocap_text
from mer_jax.config_validation import ConfigError
from mer_jax.config_validation import validate_config
from mer_jax.data import dialogue_csv

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCENE_HEADER = ['Season', 'Episode', 'Scene', 'Turn', 'Line', 'Who', 'Feeling']
SCENE_COLUMNS = ('Season', 'Episode', 'Scene')


def write_csv(path, header, rows):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def scene_schema(**changes):
  columns = dict(dialogue_column=SCENE_COLUMNS, utterance_column='Turn', text_column='Line',
                 speaker_column='Who', label_column='Feeling')
  return dialogue_csv.CsvSchema(label_names=('calm', 'upset'), **{**columns, **changes})


# --- several dialogue columns -----------------------------------------------------------------

SCENE_ROWS = [
    [1, 3, 12, 1, 'second', 'Ross', 'upset'],
    [1, 3, 12, 0, 'first', 'Rachel', 'calm'],
    [1, 4, 12, 0, 'other episode', 'Joey', 'calm'],  # same scene number, another episode
    [2, 3, 12, 0, 'other season', 'Monica', 'upset'],
    [1, 3, 12, 2, 'third', 'Rachel', 'calm'],
]


def test_several_dialogue_columns_identify_a_dialogue(tmp_path):
  path = write_csv(tmp_path / 'train_scenes.csv', SCENE_HEADER, SCENE_ROWS)
  got, report = dialogue_csv.read_dialogue_csv(path, scene_schema())
  assert [d.dialogue_id for d in got] == ['1/3/12', '1/4/12', '2/3/12']
  assert got[0].transcripts == ['first', 'second', 'third']
  assert got[0].speakers == ['Rachel', 'Ross', 'Rachel']
  assert list(got[0].labels) == [0, 1, 0]
  assert [len(d) for d in got] == [3, 1, 1]
  assert report.kept == 5 and report.dialogues == 3
  # One column of the three is not a dialogue key: the same turn repeats.
  with pytest.raises(dialogue_csv.CsvFormatError,
                     match=r'line 4: duplicate utterance Scene=12 Turn=0 \(first on line 3\)'):
    dialogue_csv.read_dialogue_csv(path, scene_schema(dialogue_column='Scene'))


def test_several_dialogue_columns_from_a_config(tmp_path):
  path = write_csv(tmp_path / 'train_scenes.csv', SCENE_HEADER, SCENE_ROWS)
  config = iemocap_text.get_config()
  config.label_names = ('calm', 'upset')
  csv_cfg = config.text.csv
  csv_cfg.preset = 'custom'
  csv_cfg.dialogue_column = list(SCENE_COLUMNS)  # a list or a tuple
  csv_cfg.utterance_column, csv_cfg.text_column = 'Turn', 'Line'
  csv_cfg.speaker_column, csv_cfg.label_column = 'Who', 'Feeling'
  schema = dialogue_csv.schema_from_config(csv_cfg, config.label_names)
  assert schema.dialogue_columns == SCENE_COLUMNS
  got, _ = dialogue_csv.read_dialogue_csv(path, schema)
  assert [d.dialogue_id for d in got] == ['1/3/12', '1/4/12', '2/3/12']
  csv_cfg.dialogue_column = ('Scene',)  # one column, as a tuple
  assert dialogue_csv.schema_from_config(csv_cfg, config.label_names).dialogue_column == 'Scene'


def test_dialogue_key_problems_name_the_columns(tmp_path):
  rows = [[1, 3, '', 0, 'hi', 'Ross', 'calm'], [1, 3, 12, 0, 'hi', 'Ross', 'calm']]
  path = write_csv(tmp_path / 'e.csv', SCENE_HEADER, rows)
  with pytest.raises(dialogue_csv.CsvFormatError, match=r"e\.csv: line 2: empty 'Scene'"):
    dialogue_csv.read_dialogue_csv(path, scene_schema())
  got, report = dialogue_csv.read_dialogue_csv(path, scene_schema(), on_bad_row='skip')
  assert report.skipped == collections.Counter({'empty dialogue id': 1})
  assert [d.dialogue_id for d in got] == ['1/3/12']
  # Values holding the separator could join to one id from two keys: an error, never a merge.
  rows = [['1/3', 4, 12, 0, 'a', 'Ross', 'calm'], [1, '3/4', 12, 0, 'b', 'Ross', 'calm']]
  path = write_csv(tmp_path / 's.csv', SCENE_HEADER, rows)
  with pytest.raises(dialogue_csv.CsvFormatError,
                     match=r"line 3: dialogue id '1/3/4/12' also comes from \('1/3', '4', '12'\) "
                           r"on line 2: a value of Season/Episode/Scene contains '/'"):
    dialogue_csv.read_dialogue_csv(path, scene_schema())
  path = write_csv(tmp_path / 'm.csv', SCENE_HEADER[1:], [row[1:] for row in SCENE_ROWS])
  with pytest.raises(dialogue_csv.CsvFormatError, match=r"missing column\(s\) \['Season'\]"):
    dialogue_csv.read_dialogue_csv(path, scene_schema())


# --- list-valued speaker cells ----------------------------------------------------------------

@pytest.mark.parametrize('cell,speaker,listed', [
    ("['Monica Geller']", 'Monica Geller', True),
    ("['Rachel Green', 'Ross Geller']", 'Rachel Green & Ross Geller', True),
    ('["Rachel Green", "Ross Geller"]', 'Rachel Green & Ross Geller', True),  # JSON
    ("[ 'Joey  Tribbiani' , ]", 'Joey Tribbiani', True),
    ("['Ross', 'Ross', ' ']", 'Ross', True),  # repeated and empty names dropped
    ("['O\\'Neil', \"D'Arcy\"]", "O'Neil & D'Arcy", True),
    ('[]', '', True),
    ('  Monica   Geller ', 'Monica Geller', False),
    ('[Monica]', '[Monica]', False),  # not a list of string literals: a name
    ("['Monica'", "['Monica'", False),
    ("['a'] + ['b']", "['a'] + ['b']", False),
    ("[__import__('os').getcwd()]", "[__import__('os').getcwd()]", False),
    ("['a', 1]", "['a', 1]", False),
])
def test_normalise_speaker(cell, speaker, listed):
  assert dialogue_csv.normalise_speaker(cell) == (speaker, listed)


def test_only_cells_that_look_like_lists_of_strings_are_parsed(monkeypatch):
  parsed = []
  literal_eval = dialogue_csv.ast.literal_eval
  monkeypatch.setattr(dialogue_csv.ast, 'literal_eval',
                      lambda text: parsed.append(text) or literal_eval(text))
  for cell in ("[__import__('os').getcwd()]", '[f(x)]', "{'a': 1}", "('a',)", 'Ross',
               "['a'] + ['b']", "['Ross']"):
    dialogue_csv.normalise_speaker(cell)
  assert parsed == ["['Ross']"]


def test_list_speakers_are_normalised_and_counted(tmp_path):
  rows = [[1, 1, 1, 0, 'hi', "['Monica Geller']", 'calm'],
          [1, 1, 1, 1, 'both', "['Rachel Green', 'Ross Geller']", 'upset'],
          [1, 1, 1, 2, 'again', 'Monica Geller', 'calm'],
          [1, 1, 1, 3, 'nobody', '[]', 'calm']]
  path = write_csv(tmp_path / 'l.csv', SCENE_HEADER, rows)
  with pytest.raises(dialogue_csv.CsvFormatError, match="line 5: empty 'Who'"):
    dialogue_csv.read_dialogue_csv(path, scene_schema())
  (d,), report = dialogue_csv.read_dialogue_csv(path, scene_schema(), on_bad_row='skip')
  assert d.speakers == ['Monica Geller', 'Rachel Green & Ross Geller', 'Monica Geller']
  assert report.listed_speakers == 2
  assert report.skipped == collections.Counter({'empty speaker': 1})
  summary = report.summary()
  assert ("normalised 2 list-valued speaker cells (first: line 2: ['Monica Geller'] -> "
          "'Monica Geller')") in summary
  assert 'skipped 1 empty speaker' in summary
  # The same speaker, listed or not, gets one rank.
  record = dialogue_csv.to_record(d, {}, {})
  assert list(record.speaker_ids) == [0, 1, 0]


# --- labels set once --------------------------------------------------------------------------

def custom_config(csv_dir, **csv_changes):
  """configs/iemocap_text.py for a custom corpus with its labels set only in label_names."""
  config = iemocap_text.get_config()
  config.label_names = ('calm', 'upset')
  config.text.csv.preset = 'custom'
  config.text.csv.dir = str(csv_dir)
  config.text.csv.pattern = '{split}_scenes.csv'
  for key, value in csv_changes.items():
    config.text.csv[key] = value
  return config


def config_problems(config) -> list[str]:
  try:
    validate_config(config)
  except ConfigError as e:
    return [line.strip() for line in str(e).splitlines()[1:]]
  return []


@pytest.fixture
def scene_dir(tmp_path):
  for split in ('train', 'dev', 'test'):
    write_csv(tmp_path / f'{split}_scenes.csv', SCENE_HEADER, SCENE_ROWS)
  return tmp_path


def test_labels_set_once_in_label_names(scene_dir):
  config = custom_config(scene_dir, dialogue_column=SCENE_COLUMNS, utterance_column='Turn',
                         text_column='Line', speaker_column='Who', label_column='Feeling')
  assert config.text.csv.label_names == ()
  assert config_problems(config) == []
  schema = dialogue_csv.schema_from_config(config.text.csv, config.label_names)
  assert schema.label_names == ('calm', 'upset')
  got, _ = dialogue_csv.read_dialogue_csv(scene_dir / 'train_scenes.csv', schema)
  assert list(got[0].labels) == [0, 1, 0]
  # Older configs that repeat them (same order) still work.
  config.text.csv.label_names = ('calm', 'upset')
  assert config_problems(config) == []
  # A preset takes the labels from label_names too; its aliases for other labels are dropped.
  iemocap = dialogue_csv.schema_from_config(iemocap_text.get_config().text.csv, ('neutral', 'sad'))
  assert iemocap.label_names == ('neutral', 'sad')
  assert iemocap.label_aliases == (('neu', 'neutral'),)


def test_contradictory_labels_are_one_line_naming_both_keys(scene_dir):
  config = custom_config(scene_dir, label_names=('upset', 'calm'))
  assert config_problems(config) == [
      "text.csv.label_names: ['upset', 'calm'] contradicts label_names ['calm', 'upset']; set "
      'the labels once, in label_names (text.csv.label_names=() reads them from there)']
  config = custom_config(scene_dir, label_aliases={'mad': 'angry'})
  assert config_problems(config) == [
      "text.csv.label_aliases.mad: 'angry' is not one of label_names ['calm', 'upset']"]


def test_a_bad_dialogue_column_is_one_line(scene_dir):
  config = custom_config(scene_dir, dialogue_column=('season', 'season'))
  assert config_problems(config) == [
      "text.csv.dialogue_column: must be a column name or a tuple of distinct column names "
      "('' or (): the preset's column), got ('season', 'season')"]

  from configs import raw_demo  # pylint: disable=g-import-not-at-top
  config = raw_demo.get_config('runlocal')
  config.text.csv.dialogue_column = ('season', 'scene')
  assert config_problems(config) == [
      "text.csv.dialogue_column: ('season', 'scene'): the raw front end finds clips as "
      'dia{D}_utt{U}.mp4, so D must be one column']


# --- the config file, from the command line and from any working directory -------------------

@pytest.mark.parametrize('value,expected', [("('Season', 'Episode', 'Scene')", SCENE_COLUMNS),
                                            ('conversation', 'conversation')])
def test_dialogue_columns_from_the_command_line(monkeypatch, value, expected):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=values,
                                  lock_config=True)
  argv = ['prog', f'--config={ROOT / "configs" / "iemocap_text.py"}',
          f'--config.text.csv.dialogue_column={value}']
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads the overrides from sys.argv
  values(argv)
  assert values.config.text.csv.dialogue_column == expected


def run_main(cwd, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('PYTHONPATH', None)
  env.pop('MER_JAX_TRACEBACK', None)
  return subprocess.run([sys.executable, '-m', 'mer_jax.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_config_file_loads_from_any_working_directory(tmp_path):
  # iemocap_text imports configs.iemocap and configs.meld_text; with no text.csv.dir it fails
  # validation, after the config (and its imports) loaded and before JAX does.
  config = ROOT / 'configs' / 'iemocap_text.py'
  own = tmp_path / 'my_corpus.py'  # a user's config outside the repository, built on ours
  own.write_text('from configs import iemocap_text\n\n\ndef get_config(arg=None):\n'
                 '  c = iemocap_text.get_config(arg)\n'
                 "  c.text.csv.dialogue_column = ('Season', 'Episode', 'Scene')\n"
                 "  c.text.csv.dir = 'nowhere'\n"
                 '  return c\n')
  for args, message in [
      ((f'--config={config}:last_layer',), 'text.csv.dir: is empty'),
      (('--config', str(config)), 'text.csv.dir: is empty'),
      (('--config', 'my_corpus.py'), "text.csv.dir: 'nowhere'"),
  ]:
    result = run_main(tmp_path, *args, '--workdir', str(tmp_path / 'w'))
    assert result.returncode == 2, result.stderr
    assert 'invalid config' in result.stderr and message in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr
  (tmp_path / 'broken.py').write_text('import no_such_module\n')
  result = run_main(tmp_path, '--config', 'broken.py', '--workdir', str(tmp_path / 'w'))
  assert result.returncode == 2
  assert result.stderr.strip() == "error: --config: No module named 'no_such_module'"
