"""The Python API and model bundles: `mer_jax.load(path).predict(dialogues)` on a workdir and on a
bundle written by `mer_jax.export`, moved away from everything it came from.

Two workdirs: the cheapest trained one (a one-epoch teacher of the tiny config, on feature
vectors), and a text model from transcripts, built by hand (training one takes minutes here):
a tiny local BERT with fine-tuned weights that the bundle must carry.
"""

import json
import os
import shutil
import subprocess
import sys

from flax import nnx
import jax
import pytest

import mer_jax
from configs import default
from configs import meld_text
from configs import raw_demo
from mer_jax import bundle
from mer_jax import errors
from mer_jax import export
from mer_jax import predict
from mer_jax.preprocess import raw
from mer_jax.preprocess import text_features
from mer_jax.preprocess import text_finetune
from mer_jax.run import job
from mer_jax.train import checkpointing
from mer_jax.train import inference
from mer_jax.train import sharding
from mer_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = default.get_config('tiny').data.dims.to_dict()
WORDS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'i', 'am', 'so', 'happy', 'sad', 'angry',
         'ok', 'the', 'a', '.', 'what', 'is', 'it', 'you', 'we', 'well', 'yes', 'no']


def features(*modalities, value=0.25):
  return {m: [value] * DIMS[m] for m in modalities}


DIALOGUES = [
    {'dialogue_id': 'd1', 'utterances': [
        {'speaker': 'Ann', 'text': 'hi', 'features': features('t', 'a', 'v')},
        {'speaker': 'Bob', 'features': features('t', value=-0.5)}]},
    {'dialogue_id': 2, 'utterances': [
        {'utterance_id': 9, 'speaker': 'Cy', 'features': {**features('t', value=1.0), 'v': None}}]},
]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  config = default.get_config('tiny')
  config.train.stages = ('teacher',)
  config.train.epochs = 1
  folder = str(tmp_path_factory.mktemp('api') / 'w')
  job.train_and_evaluate(config, folder)
  return folder


@pytest.fixture(scope='module')
def text_workdir(tmp_path_factory):
  """A text model as training leaves it, built without training: a tiny local BERT (the config's
  text.encoder), fine-tuned weights that differ from it, a teacher checkpoint and results.json.
  Returns (workdir, encoder folder)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  base = tmp_path_factory.mktemp('api_text')
  encoder_dir = base / 'tiny_bert'
  torch.manual_seed(0)
  transformers.BertModel(transformers.BertConfig(
      vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64)).save_pretrained(encoder_dir)
  transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(
      encoder_dir)
  config = meld_text.get_config('finetune')
  config.text.encoder = str(encoder_dir)
  config.text.max_length = 32
  config.text.layers = (-1,)
  config.data.dims.t = 32
  config.train.stages = ('teacher',)
  config.model.teacher.hidden, config.model.teacher.heads = 8, 2
  config.mesh.shape = {'data': 1, 'model': 1}
  workdir = str(base / 'w')
  meta = {'stage': 'teacher', 'epoch': 1, 'label_names': list(config.label_names),
          'config': json.loads(json.dumps(config.to_dict()))}
  _, params, batch_stats, _ = inference.build_sharded_model('teacher', config,
                                                            sharding.make_mesh(config), seed=0)
  ckpt = checkpointing.StageCheckpoints(workdir, 'teacher')
  ckpt.save_best(1, params, batch_stats, meta)
  ckpt.close()
  tok = text_features.prompt_tokenizer(config.text, str(encoder_dir))
  encoder, _ = text_features.load_encoder(config.text, tok.vocab_size)
  _, tuned, _ = nnx.split(text_finetune.build_classifier(config, encoder), nnx.Param, ...)
  tuned = jax.tree.map(lambda x: x * 1.5, tuned)
  ckpt = checkpointing.StageCheckpoints(workdir, text_finetune.CHECKPOINT_NAME)
  ckpt.save_best(1, tuned, {}, meta)
  ckpt.close()
  trainer.save_results({'teacher': {'test_weighted_f1': 0.5, 'test_macro_f1': 0.25,
                                    'test_accuracy': 0.5, 'dev_weighted_f1': 0.5,
                                    'best_epoch': 1}}, workdir, config)
  return workdir, str(encoder_dir)


def exported_and_moved(workdir: str, tmp_path) -> str:
  """Exports a copy of `workdir`, moves the bundle and deletes the copy and the first bundle."""
  copy, first, moved = tmp_path / 'copy', tmp_path / 'bundle', tmp_path / 'elsewhere' / 'model'
  shutil.copytree(workdir, copy)
  export.export_bundle(str(copy), str(first))
  shutil.copytree(first, moved)
  shutil.rmtree(first)
  shutil.rmtree(copy)
  return str(moved)


def test_import_mer_jax_does_not_import_jax():
  code = 'import sys, mer_jax; assert callable(mer_jax.load); print("jax" in sys.modules)'
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
  assert proc.stdout.strip() == 'False', proc.stderr


def test_predict_labels_plain_dicts(workdir):
  model = mer_jax.load(workdir)
  rows = model.predict(DIALOGUES)
  assert [(r['dialogue_id'], r['utterance_id'], r['speaker']) for r in rows] == [
      ('d1', 0, 'Ann'), ('d1', 1, 'Bob'), ('2', 9, 'Cy')]
  for row in rows:
    probs = row['probabilities']
    assert list(probs) == list(model.label_names)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert row['emotion'] == max(probs, key=probs.get)
    assert row['modalities'] == ['t']  # the teacher reads text features only
  assert model.predict(DIALOGUES[1]) == rows[2:]  # one dialogue alone, as a dict
  # The same rows as the file predict reads and the CLI writes.
  assert model.predict_records(model.read_dialogues(DIALOGUES)) == rows


def test_an_utterance_without_usable_input_is_an_error_naming_it(workdir):
  model = mer_jax.load(workdir)
  no_text = {'dialogue_id': 'd7', 'utterances': [
      {'speaker': 'Ann', 'features': features('t')},
      {'utterance_id': 4, 'speaker': 'Bob', 'features': features('a', 'v')}]}
  with pytest.raises(predict.PredictInputError) as e:
    model.predict([no_text])
  assert str(e.value) == ('dialogue "d7", utterance_id 4 (utterances[1]): has no input this '
                          'model reads; give text features (features.t)')
  clip = {'utterances': [{'speaker': 'Ann', 'video': 'clip.mp4', 'text': 'hi'}]}
  with pytest.raises(predict.PredictInputError,
                     match=r'^dialogues\[0\]: utterances\[0\].video: this model cannot read clips'):
    model.predict([clip])
  with pytest.raises(predict.PredictInputError,
                     match=r'^dialogues\[1\]: dialogue_id: "d1" repeats dialogues\[0\]$'):
    model.predict([DIALOGUES[0], DIALOGUES[0]])


def test_a_moved_bundle_predicts_exactly_as_its_workdir(workdir, tmp_path):
  want = mer_jax.load(workdir).predict(DIALOGUES)
  moved = exported_and_moved(workdir, tmp_path)
  model = mer_jax.load(moved)
  assert model.predict(DIALOGUES) == want  # bit for bit: the floats compare equal
  manifest = bundle.read_manifest(moved)
  assert (manifest['stage'], manifest['checkpoints'], manifest['modalities']) == (
      'teacher', ['teacher'], ['t'])
  assert sorted(os.listdir(moved)) == ['README.md', 'bundle.json', 'checkpoints', 'config.json',
                                       'reports', 'results.json']
  assert os.listdir(os.path.join(moved, 'checkpoints')) == ['teacher']
  with open(os.path.join(moved, 'results.json')) as f:
    results = json.load(f)
  card = open(os.path.join(moved, 'README.md'), encoding='utf-8').read()
  f1 = 100 * results['stages']['teacher']['test_weighted_f1']
  assert f'| teacher (this model) | {f1:.2f} |' in card
  assert 'Confusion matrix' in card and str(results['git_commit'] or '(unknown)') in card


def test_export_command_writes_a_bundle(workdir, tmp_path):
  """python -m mer_jax.export (the mer-jax-export console script) into an empty folder."""
  env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', JAX_PLATFORMS='cpu')
  out = tmp_path / 'model'
  out.mkdir()  # an empty folder is taken
  proc = subprocess.run([sys.executable, '-m', 'mer_jax.export', '--workdir', workdir, '--out',
                         str(out)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.splitlines()[-1] == f'wrote the teacher model (teacher) to {out}'
  assert bundle.is_bundle(str(out))


def test_export_refuses_and_writes_nothing(workdir, tmp_path):
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'keep.txt').write_text('mine')
  (tmp_path / 'file').write_text('mine')
  unfinished = tmp_path / 'unfinished'
  shutil.copytree(workdir, unfinished)
  os.remove(unfinished / 'results.json')
  before = sorted(os.listdir(tmp_path))
  cases = [(workdir, tmp_path / 'full', 'is not empty'),
           (workdir, tmp_path / 'file', 'exists and is not a folder'),
           (workdir, tmp_path / 'no' / 'out', 'does not exist'),
           (str(tmp_path / 'empty'), tmp_path / 'out', 'no trained stage checkpoints'),
           (str(unfinished), tmp_path / 'out', 'no results.json')]
  for source, out, message in cases:
    with pytest.raises(errors.UserError, match=message):
      export.export_bundle(source, str(out))
    assert sorted(os.listdir(tmp_path)) == before, message
  assert (tmp_path / 'full' / 'keep.txt').read_text() == 'mine'


def test_text_model_bundle_carries_its_encoder(text_workdir, tmp_path):
  workdir, encoder = text_workdir
  dialogues = [{'dialogue_id': 'x', 'utterances': [
      {'speaker': 'Ann', 'text': 'i am so happy .'}, {'speaker': 'Bob', 'text': 'so sad .'}]}]
  want = mer_jax.load(workdir).predict(dialogues)
  assert [r['modalities'] for r in want] == [['t'], ['t']]
  moved = exported_and_moved(workdir, tmp_path)
  shutil.rmtree(encoder)  # the bundle reads its own copy (and its fine-tuned weights)
  model = mer_jax.load(moved)
  assert model.predict(dialogues) == want
  manifest = bundle.read_manifest(moved)
  assert manifest['checkpoints'] == ['teacher', 'text_finetune']
  assert manifest['text_encoder']['finetuned']
  assert {'config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'} <= set(
      os.listdir(os.path.join(moved, 'text_encoder')))
  # Records whose text features were never computed are refused, not labelled from nothing.
  records = [predict.parse_dialogue(dialogues[0], 'x', ('t',), {'t': 32},
                                    text_from_transcripts=True)]
  with pytest.raises(predict.PredictInputError, match=r'^dialogue "x", utterance_id 0 '
                     r'\(utterances\[0\]\): has no input this model reads; give text features '
                     r'\(features.t\), or its "text"'):
    model.probabilities(records)


def test_a_model_trained_from_clips_ships_its_av_front_end(tmp_path):
  """The LipSyncNet where the raw front end left it (the data cache) and a local clip encoder
  folder are copied; an encoder initialised at random is recorded by its seed."""
  config = raw_demo.get_config()
  workdir = str(tmp_path / 'w')
  lipsync = raw.lipsync_dir(config, raw.clips_dir(config, workdir, raw.raw_root(config, workdir)))
  best = os.path.join(lipsync, 'checkpoints', 'lipsync', 'best', '7')
  os.makedirs(best)
  open(os.path.join(best, 'weights'), 'w').close()
  open(os.path.join(lipsync, raw.LIPSYNC_DONE), 'w').write('{}')
  audio = tmp_path / 'wav2vec2'
  audio.mkdir()
  for name in ('config.json', 'model.safetensors', 'preprocessor_config.json', 'notes.md'):
    (audio / name).write_text('x')
  config.raw.audio_encoder.checkpoint = str(audio)
  out = tmp_path / 'bundle'
  out.mkdir()
  got = export.copy_av_front_end(config, workdir, str(out))
  assert got == {
      'lipsync': bundle.LIPSYNC,
      'audio_encoder': {'name': str(audio), 'path': bundle.AV_ENCODERS['audio_encoder'],
                        'files': ['config.json', 'model.safetensors', 'preprocessor_config.json']},
      'visual_encoder': {'random_init_seed': int(config.raw.encoder_seed)}}
  assert os.path.isfile(out / bundle.LIPSYNC / 'checkpoints' / 'lipsync' / 'best' / '7' / 'weights')
  assert os.path.isfile(out / bundle.LIPSYNC / raw.LIPSYNC_DONE)
  # Without the trained LipSyncNet (a cleared data cache) the bundle says so.
  shutil.rmtree(lipsync)
  assert export.copy_av_front_end(config, workdir, str(tmp_path / 'other'))['lipsync'] is None
