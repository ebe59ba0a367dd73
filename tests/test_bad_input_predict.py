"""predict never harms its input: --output is checked (not the input, not a folder, its folder
there and writable) before any model loads and written atomically; dialogue and utterance ids are
checked (integers in the int32 range, unique) with the line and key named; a dialogue CSV's ids
too. Every refused run leaves the input byte for byte as it was and writes no output."""

import json
import os
import subprocess
import sys
import types

import pytest

from configs import default
from mer_jax import predict
from mer_jax.data import dialogue_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INT32_MAX = 2**31 - 1
INT32_RANGE = '[-2147483648, 2147483647]'
IS_ROOT = hasattr(os, 'geteuid') and os.geteuid() == 0


def tiny():
  return default.get_config('tiny')


DIMS = tiny().data.dims.to_dict()


ABSENT = object()


def utterance(uid=ABSENT, **fields):
  u = {'speaker': 'Ann', 'text': 'hi', 'features': {m: [0.5] * d for m, d in DIMS.items()}}
  if uid is not ABSENT:
    u['utterance_id'] = uid
  u.update(fields)
  return u


def line(*utterances, dialogue_id='d1', **fields):
  return json.dumps({'dialogue_id': dialogue_id, 'utterances': list(utterances), **fields})


def write_input(folder, lines) -> str:
  path = folder / 'in.jsonl'
  path.write_text(''.join(l + '\n' for l in lines), encoding='utf-8')
  return str(path)


def read(path):
  """Predictor.read_jsonl with the tiny config's dims and no text featurizer."""
  return predict.Predictor.read_jsonl(types.SimpleNamespace(config=tiny(), text=None), path)


def refused(path, folder) -> str:
  """read_jsonl's PredictInputError message; checks the input is unchanged and nothing new was
  written beside it."""
  before, listing = open(path, 'rb').read(), sorted(os.listdir(folder))
  with pytest.raises(predict.PredictInputError) as e:
    read(path)
  assert open(path, 'rb').read() == before
  assert sorted(os.listdir(folder)) == listing
  return str(e.value)


# --- --input and --output, before any work -------------------------------------------------

@pytest.fixture
def given(tmp_path):
  """An input file; `check` asserts check_paths' message and that nothing changed."""
  path = write_input(tmp_path, [line(utterance(0))])
  data = open(path, 'rb').read()

  def check(output, message, input_path=path):
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(predict.PredictInputError) as e:
      predict.check_paths(input_path, output)
    assert str(e.value) == message
    assert open(path, 'rb').read() == data
    assert sorted(os.listdir(tmp_path)) == listing

  return types.SimpleNamespace(path=path, folder=tmp_path, check=check)


def test_output_that_is_the_input(given, monkeypatch):
  given.check(given.path, f'--output {given.path}: is the input file (--input {given.path}); '
              'predict never writes over its input')
  # The same file spelled another way: relative, through '..', through a symlink, a hard link.
  monkeypatch.chdir(given.folder)
  (given.folder / 'sub').mkdir()
  link, hard = given.folder / 'link.jsonl', given.folder / 'hard.jsonl'
  link.symlink_to(given.path)
  os.link(given.path, hard)
  for spelling in ('in.jsonl', './in.jsonl', 'sub/../in.jsonl', str(link), str(hard)):
    given.check(spelling, f'--output {spelling}: is the input file (--input {given.path}); '
                'predict never writes over its input')
  # ... and the input spelled relatively.
  given.check(given.path, f'--output {given.path}: is the input file (--input ./in.jsonl); '
              'predict never writes over its input', input_path='./in.jsonl')


def test_output_folder_that_does_not_exist(given):
  output = str(given.folder / 'missing' / 'out.jsonl')
  given.check(output, f'--output {output}: folder {given.folder / "missing"} does not exist')
  file_as_folder = os.path.join(given.path, 'out.jsonl')  # a file where a folder should be
  given.check(file_as_folder, f'--output {file_as_folder}: {given.path} is not a folder')


def test_output_that_is_a_folder(given):
  (given.folder / 'results').mkdir()
  for output in (str(given.folder / 'results'), str(given.folder / 'new') + '/'):
    given.check(output, f'--output {output}: is a folder; name a file for the predictions')


def test_output_folder_that_is_not_writable(given, monkeypatch):
  folder = given.folder / 'locked'
  folder.mkdir()
  output = str(folder / 'out.jsonl')
  message = f'--output {output}: folder {folder} is not writable'
  if not IS_ROOT:
    folder.chmod(0o500)
    try:
      given.check(output, message)
    finally:
      folder.chmod(0o700)
  # As root os.access allows everything; a folder it denies is refused all the same.
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode, **kw: (
      os.fspath(p) != str(folder) and real_access(p, mode, **kw)))
  given.check(output, message)


def test_output_file_that_is_read_only(given, monkeypatch):
  output = given.folder / 'out.jsonl'
  output.write_text('kept\n')
  output.chmod(0o444)
  message = f'--output {output}: exists and is read-only'
  if not IS_ROOT:
    given.check(str(output), message)
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode, **kw: (
      os.fspath(p) != str(output) and real_access(p, mode, **kw)))
  given.check(str(output), message)
  assert output.read_text() == 'kept\n'


def test_input_that_is_missing_or_a_folder(given):
  missing = str(given.folder / 'nowhere.jsonl')
  given.check(None, f'--input {missing}: no such file', input_path=missing)
  given.check(str(given.folder / 'out.jsonl'), f'--input {given.folder}: is a folder, not a '
              'JSONL file', input_path=str(given.folder))


def test_good_paths_pass(given):
  predict.check_paths(given.path, None)
  predict.check_paths(given.path, str(given.folder / 'out.jsonl'))
  (given.folder / 'old.jsonl').write_text('old\n')  # replacing an earlier output is fine
  predict.check_paths(given.path, str(given.folder / 'old.jsonl'))


def test_predictions_are_written_atomically(tmp_path):
  path = tmp_path / 'out.jsonl'
  path.write_text('earlier predictions\n')
  with pytest.raises(TypeError):  # the second row cannot be written: the old file stays whole
    predict.write_predictions(str(path), [{'a': 1}, {'b': object()}])
  assert path.read_text() == 'earlier predictions\n'
  assert os.listdir(tmp_path) == ['out.jsonl']  # no temporary file left behind
  predict.write_predictions(str(path), [{'a': 1}, {'b': 2}])
  assert path.read_text() == '{"a": 1}\n{"b": 2}\n'
  assert os.listdir(tmp_path) == ['out.jsonl']


# --- the JSONL input: values, ids ----------------------------------------------------------

def test_utterance_ids_repeated_within_a_dialogue(tmp_path):
  path = write_input(tmp_path, [line(utterance(1), utterance(2)),
                                line(utterance(5), utterance(5), utterance(5), dialogue_id='d2')])
  assert refused(path, tmp_path) == (
      f"{path}:2: utterances[1].utterance_id: 5 repeats utterances[0]'s id")
  # An id given to one utterance that another has by position (no utterance_id), both ways.
  path = write_input(tmp_path, [line(utterance(), utterance(0))])
  assert refused(path, tmp_path) == (
      f"{path}:1: utterances[1].utterance_id: 0 repeats utterances[0]'s id (its position: it "
      'gives no utterance_id)')
  path = write_input(tmp_path, [line(utterance(1), utterance())])
  assert refused(path, tmp_path) == (
      f"{path}:1: utterances[1]: gives no utterance_id, and its position 1 repeats "
      "utterances[0]'s id")


@pytest.mark.parametrize('value, shown', [
    (1.5, '1.5'), (5.0, '5.0'), ('5', '"5"'), (True, 'true'), (None, 'null'), ([5], '[5]'),
    ({'id': 5}, '{"id": 5}'), ('x' * 100, '"' + 'x' * 36 + '...'),
])
def test_utterance_id_that_is_not_an_integer(tmp_path, value, shown):
  path = write_input(tmp_path, [line(utterance(0), utterance(value))])
  assert refused(path, tmp_path) == (
      f'{path}:1: utterances[1].utterance_id: expected an integer, got {shown}')


@pytest.mark.parametrize('value', [2**40, INT32_MAX + 1, -2**31 - 1, 10**4000])
def test_utterance_id_outside_int32(tmp_path, value):
  path = write_input(tmp_path, [line(utterance(value))])
  shown = str(value) if len(str(value)) <= 40 else str(value)[:37] + '...'
  assert refused(path, tmp_path) == (
      f'{path}:1: utterances[0].utterance_id: {shown} is outside the int32 range {INT32_RANGE}')


def test_ids_at_the_int32_limits_and_negative_ids_are_kept(tmp_path):
  path = write_input(tmp_path, [line(utterance(INT32_MAX), utterance(-2**31), utterance(-3)),
                                line(utterance(), utterance(), dialogue_id=7)])
  first, second = read(path)
  assert first.utterance_ids.tolist() == [INT32_MAX, -2**31, -3]
  assert (second.dialogue_id, second.utterance_ids.tolist()) == ('7', [0, 1])
  rows = predict.format_predictions([first], [first.features['t'][:, :2]], ('a', 'b'))
  assert [r['utterance_id'] for r in rows] == [INT32_MAX, -2**31, -3]


def test_dialogue_ids_repeated_in_a_file(tmp_path):
  path = write_input(tmp_path, [line(utterance(0), dialogue_id='d1'), '',
                                line(utterance(0), dialogue_id='d2'),
                                line(utterance(0), dialogue_id='d1')])
  assert refused(path, tmp_path) == f'{path}:4: dialogue_id: "d1" repeats the dialogue on line 1'
  # An integer id and its string are the same id in the predictions.
  path = write_input(tmp_path, [line(utterance(0), dialogue_id=5),
                                line(utterance(0), dialogue_id='5')])
  assert refused(path, tmp_path) == f'{path}:2: dialogue_id: "5" repeats the dialogue on line 1'
  # A dialogue without an id is named by its line; an explicit id of that name collides (the
  # message shortens long ids).
  path = str(tmp_path / 'in.jsonl')
  write_input(tmp_path, [json.dumps({'utterances': [utterance(0)]}),
                         line(utterance(0), dialogue_id=f'{path}:1')])
  shown = json.dumps(f'{path}:1')[:37] + '...'
  assert refused(path, tmp_path) == f'{path}:2: dialogue_id: {shown} repeats the dialogue on line 1'
  assert len(shown) == 40 and len(json.dumps(f'{path}:1')) > 40


@pytest.mark.parametrize('value, message', [
    (1.5, 'expected a string or an integer, got 1.5'),
    (False, 'expected a string or an integer, got false'),
    (None, 'expected a string or an integer, got null'),
    (['d1'], 'expected a string or an integer, got ["d1"]'),
    ('  ', 'empty'),
])
def test_dialogue_id_that_is_not_a_string(tmp_path, value, message):
  path = write_input(tmp_path, [line(utterance(0)), line(utterance(0), dialogue_id=value)])
  assert refused(path, tmp_path) == f'{path}:2: dialogue_id: {message}'


@pytest.mark.parametrize('text, message', [
    ('{"dialogue_id": "d1", "utterances": [{"utterance_id": 1' + '0' * 5000 + '}]}',
     'invalid JSON (Exceeds the limit (4300 digits) for integer string conversion: value has 5001 '
     'digits)'),
    ('[' * 100_000 + ']' * 100_000, 'invalid JSON (nested too deeply)'),
])
def test_json_that_the_parser_cannot_hold(tmp_path, text, message):
  path = write_input(tmp_path, [line(utterance(0)), text])
  assert refused(path, tmp_path) == f'{path}:2: {message}'


@pytest.mark.parametrize('fields, message', [
    ({'features': 'tav'}, 'utterances[0].features: expected an object, got "tav"'),
    ({'features': [[0.5]]}, 'utterances[0].features: expected an object, got [[0.5]]'),
    ({'speaker': 7}, 'utterances[0].speaker: expected a string, got 7'),
    ({'text': {'en': 'hi'}}, 'utterances[0].text: expected a string, got {"en": "hi"}'),
])
def test_utterance_fields_of_the_wrong_type(tmp_path, fields, message):
  path = write_input(tmp_path, [line(utterance(0, **fields))])
  assert refused(path, tmp_path) == f'{path}:1: {message}'


def test_feature_number_too_large_for_a_float(tmp_path):
  features = {m: [0.5] * d for m, d in DIMS.items()}
  features['a'][3] = 10**400  # JSON integers have no limit; float32 does
  path = write_input(tmp_path, [line(utterance(0, features=features))])
  assert refused(path, tmp_path).startswith(
      f'{path}:1: utterances[0].features.a: not a list of numbers (')


def test_null_speaker_and_text_are_as_if_absent(tmp_path):
  (record,) = read(write_input(tmp_path, [line(utterance(0, speaker=None, text=None))]))
  assert (record.speakers, record.transcripts) == (['unknown'], [''])


def features(**changes):
  given = {m: [0.5] * d for m, d in DIMS.items()}
  given.update(changes)
  return given


def test_valid_predict_input_parses(tmp_path):
  path = write_input(tmp_path, [
      line(utterance(), utterance(features=features(a=None))), '',
      line(utterance(), dialogue_id='d2')])
  records = read(path)
  assert [len(r.labels) for r in records] == [2, 1]
  assert [r.dialogue_id for r in records] == ['d1', 'd2']
  assert records[0].utterance_ids.tolist() == [0, 1]  # by position
  assert records[0].present['a'].tolist() == [True, False]
  assert not records[0].features['a'][1].any()


@pytest.mark.parametrize('case, lines, message', [
    ('invalid json', [line(utterance()), '{"utterances": ['],
     '2: invalid JSON (Expecting value)'),
    ('wrong length', [line(utterance(), utterance(features=features(a=[1.0] * 5)))],
     '1: utterances[1].features.a: expected 24 numbers, got shape (5,)'),
    ('nan feature', [line(utterance(features=features(t=[float('nan')] * DIMS['t'])))],
     '1: utterances[0].features.t: contains NaN or Inf'),
    ('unknown modality', [line(utterance(features=features(x=[1.0])))],
     "1: utterances[0].features: unknown modality keys ['x']"),
    ('not a list', [line(utterance(features=features(v='loud')))],
     '1: utterances[0].features.v: not a list of numbers ('),
    ('no utterances', [json.dumps({'dialogue_id': 'd'})],
     '1: "utterances" must be a non-empty list'),
    ('not an object', ['[1, 2]'], '1: expected a JSON object, got list'),
    ('utterance not an object', [line(utterance(), 'hi')], '1: utterances[1]: expected an object'),
])
def test_bad_predict_input_names_line_and_key(tmp_path, case, lines, message):
  path = write_input(tmp_path, lines)
  assert refused(path, tmp_path).startswith(f'{path}:{message}'), case


def test_predict_input_that_is_not_utf8(tmp_path):
  path = tmp_path / 'in.jsonl'
  path.write_bytes(b'{"dialogue_id": "caf\xe9", "utterances": []}\n')
  assert refused(str(path), tmp_path).startswith(f'{path}: not UTF-8 text (')


def test_empty_predict_input(tmp_path):
  path = write_input(tmp_path, ['', '   '])
  assert refused(path, tmp_path) == f'{path}: no dialogues'


def test_predict_dialogue_longer_than_the_node_budget(tmp_path):
  max_nodes = tiny().batch.max_nodes
  path = write_input(tmp_path, [line(utterance()),
                                line(*[utterance(i) for i in range(max_nodes)], dialogue_id='d2')])
  assert refused(path, tmp_path) == (
      f'{path}: a dialogue has {max_nodes} utterances; this model was configured for at most '
      f'{max_nodes - 1}')


# --- ids in a dialogue CSV ------------------------------------------------------------------

HEADER = 'Sr No.,Utterance,Speaker,Emotion,Dialogue_ID,Utterance_ID\n'


def write_csv(tmp_path, rows) -> str:
  path = tmp_path / 'd.csv'
  path.write_text(HEADER + ''.join(r + '\n' for r in rows), encoding='utf-8')
  return str(path)


@pytest.mark.parametrize('cell, reason, detail', [
    (str(2**40), 'utterance id out of range',
     f"column 'Utterance_ID': 1099511627776 is outside the int32 range {INT32_RANGE}"),
    (str(-2**31 - 1), 'utterance id out of range',
     f"column 'Utterance_ID': -2147483649 is outside the int32 range {INT32_RANGE}"),
    ('9' * 60, 'utterance id out of range',
     f"column 'Utterance_ID': {'9' * 37}... is outside the int32 range {INT32_RANGE}"),
    ('1_000', 'non-integer utterance id', "column 'Utterance_ID' must be an integer, got '1_000'"),
    ('1.0', 'non-integer utterance id', "column 'Utterance_ID' must be an integer, got '1.0'"),
])
def test_csv_utterance_id_outside_int32(tmp_path, cell, reason, detail):
  path = write_csv(tmp_path, ['1,hello,A,joy,0,0', f'2,hi,A,joy,0,{cell}', '3,bye,B,joy,0,2'])
  before = open(path, 'rb').read()
  with pytest.raises(dialogue_csv.CsvFormatError) as e:
    dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA)
  assert str(e.value) == f'{path}: line 3: {detail}'
  dialogues, report = dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA,
                                                     on_bad_row='skip')
  assert dialogues[0].utterance_ids.tolist() == [0, 2]
  assert dict(report.skipped) == {reason: 1} and report.examples[reason] == f'line 3: {detail}'
  assert open(path, 'rb').read() == before


def test_csv_ids_that_fit(tmp_path):
  """Negative utterance ids and the int32 limits are kept; a dialogue id is text, so a huge
  number there cannot overflow."""
  big = str(2**80)
  path = write_csv(tmp_path, [f'1,a,A,joy,{big},{INT32_MAX}', f'2,b,B,joy,{big},-1',
                              f'3,c,A,joy,{big},{-2**31}', '4,d,A,joy,-5, +3 '])
  dialogues, report = dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA)
  assert [d.dialogue_id for d in dialogues] == [big, '-5']
  assert dialogues[0].utterance_ids.tolist() == [-2**31, -1, INT32_MAX]
  assert dialogues[1].utterance_ids.tolist() == [3]
  assert not report.skipped


@pytest.mark.parametrize('row, at', [
    ('2,"' + 'x' * 200_000 + '",A,joy,0,1', 3),
    ('2,"two\nlines ' + 'x' * 200_000 + '",A,joy,0,1', 4),  # a quoted cell over lines 3-4
])
def test_csv_cell_beyond_the_csv_field_limit(tmp_path, row, at):
  path = write_csv(tmp_path, ['1,hello,A,joy,0,0', row, '3,bye,A,joy,0,2'])
  with pytest.raises(dialogue_csv.CsvFormatError) as e:
    dialogue_csv.read_dialogue_csv(path, dialogue_csv.MELD_SCHEMA, on_bad_row='skip')
  assert str(e.value) == f'{path}: line {at}: field larger than field limit (131072)'


# --- the command line -----------------------------------------------------------------------

def run_predict(*args) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != 'MER_JAX_TRACEBACK'}
  return subprocess.run(
      [sys.executable, '-m', 'mer_jax.predict', *args], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env=dict(env, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', JAX_PLATFORMS='cpu'))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir holding an (untrained) teacher's best checkpoint, as training saves it."""
  from mer_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  from mer_jax.train import inference  # pylint: disable=g-import-not-at-top
  from mer_jax.train import sharding  # pylint: disable=g-import-not-at-top
  config = tiny()
  config.train.stages = ('teacher',)
  folder = tmp_path_factory.mktemp('predict') / 'w'
  _, params, batch_stats, _ = inference.build_sharded_model('teacher', config,
                                                            sharding.make_mesh(config), seed=0)
  ckpt = checkpointing.StageCheckpoints(str(folder), 'teacher')
  meta = {'stage': 'teacher', 'epoch': 1, 'label_names': list(config.label_names),
          'config': json.loads(json.dumps(config.to_dict()))}
  ckpt.save_best(1, params, batch_stats, meta)
  ckpt.close()
  return str(folder)


def test_cli_refuses_the_input_as_output_before_reading_the_workdir(tmp_path):
  path = write_input(tmp_path, [line(utterance(0))])
  before = open(path, 'rb').read()
  proc = run_predict('--workdir', str(tmp_path / 'no_workdir'), '--input', path,
                     '--output', path)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr == (f'error: --output {path}: is the input file (--input {path}); predict '
                         'never writes over its input\n')
  assert proc.stdout == ''
  assert open(path, 'rb').read() == before
  assert os.listdir(tmp_path) == ['in.jsonl']


def test_cli_predicts_quietly_and_atomically_and_refuses_repeated_ids(workdir, tmp_path):
  """One test, so that one worker builds the workdir."""
  path = write_input(tmp_path, [line(utterance(3), utterance(7)),
                                line(utterance(-2), dialogue_id='d2')])
  before = open(path, 'rb').read()
  output = tmp_path / 'out.jsonl'
  output.write_text('earlier predictions\n')
  proc = run_predict('--workdir', workdir, '--input', path, '--output', str(output))
  assert proc.returncode == 0, proc.stderr
  assert [l.split('\t')[:2] for l in proc.stdout.splitlines()] == [
      ['d1', '3'], ['d1', '7'], ['d2', '-2']]
  rows = [json.loads(l) for l in output.read_text().splitlines()]
  assert [(r['dialogue_id'], r['utterance_id']) for r in rows] == [('d1', 3), ('d1', 7),
                                                                    ('d2', -2)]
  assert open(path, 'rb').read() == before
  assert sorted(os.listdir(tmp_path)) == ['in.jsonl', 'out.jsonl']  # no temporary file left
  # Library logs stay at WARNING: no absl INFO lines (Orbax printed ~170 of them).
  stderr = proc.stderr.splitlines()
  assert not [l for l in stderr if l[:1] == 'I' and l[1:5].isdigit()], proc.stderr
  assert stderr[-1] == f'wrote 3 predictions to {output}'

  # Three utterances all ('d1', 5): refused (once the checkpoint's config is read: the input is
  # parsed with it), the earlier output kept.
  predicted = output.read_bytes()
  path = write_input(tmp_path, [line(utterance(5), utterance(5), utterance(5))])
  before = open(path, 'rb').read()
  proc = run_predict('--workdir', workdir, '--input', path, '--output', str(output))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.splitlines()[-1] == (
      f"error: {path}:1: utterances[1].utterance_id: 5 repeats utterances[0]'s id")
  assert proc.stdout == ''
  assert open(path, 'rb').read() == before
  assert output.read_bytes() == predicted
  assert sorted(os.listdir(tmp_path)) == ['in.jsonl', 'out.jsonl']
