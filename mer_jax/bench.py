"""Throughput of every stage's train step and of the input pipeline, at the authors' MELD sizes.

  python -m mer_jax.bench [--config configs/default.py] [--steps 20] [--rounds 5] [--moe both]
      [--equal_batch_utterances 16] [--config.<key>=<value> ...]
  (installed: mer-jax-bench [flags])

Prints, per stage: examples (utterances) per second, model FLOPs per step from XLA's cost
analysis, achieved FLOP/s next to the fp32 matmul peak measured in the same run, and the input
pipeline's batches per second against the step's, and the seconds its train step took to trace
and lower, then to compile (cold: the bench's compilation cache is a fresh folder). Then where the step's time goes: its matmuls
timed alone (every dot_general of the traced step, at its shapes, in one program), its parameter
update alone (clipping, optimizer, EMA, accumulation: a pass over every parameter, the same at any
batch size) and the rest; and the share of the peak the step would reach if only its matmuls and
its update took time. Then projects a full MELD run (9,989 training utterances, 30 epochs, every
stage, no early stopping), for the authors' stages and for our default (which adds the
cross-fitted encoders of stacked fusion).

Our stages train on whole-dialogue batches (about 40 utterances a step at the default budget) while
the authors' recipe uses 16 utterances a step; per utterance, part of a speed-up over their code
comes from the larger batch alone. So every stage is also timed at an equal batch: the
whole-dialogue budget (batch.max_nodes, batch.max_graphs) whose batches hold closest to
`--equal_batch_utterances` utterances on average (`equal_batch_budget`; 0 leaves these rows out).
Those rows are labelled with the target (`teacher@16`) and show their measured utterances per step,
and the projections are printed at both batches, each saying which batch it uses.

Every stage is compiled and warmed up first; then each of `--rounds` rounds measures the matmul
peak and times `--steps` input batches, steps, matmul programs and updates of every stage in turn.
The numbers printed are medians over all rounds, so a slow spell of a shared machine weighs on
every stage alike.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from mer_jax import batch_contract
from mer_jax import cli
from mer_jax import config_validation
from mer_jax import errors
from mer_jax import stages
from mer_jax.data import pipeline
from mer_jax.data import sources
from mer_jax.run import job
from mer_jax.train import cpu_backend
from mer_jax.train import inference
from mer_jax.train import sharding
from mer_jax.train import stacking
from mer_jax.train import stage as stage_lib
from mer_jax.train import steps as steps_lib

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command's flags, defined when it runs (cli.run_absl), not on import."""
  config_flags.DEFINE_config_file('config', 'configs/default.py', 'Base config (as for '
                                  'mer_jax.main; --config.<key>=<value> overrides a key).',
                                  flag_values=flag_values)
  flags.DEFINE_integer('steps', 20, 'Timed steps (and input batches) per stage and round.',
                       flag_values=flag_values)
  flags.DEFINE_integer('rounds', 5, 'Timing rounds, each over every stage in turn.',
                       flag_values=flag_values)
  flags.DEFINE_enum('moe', 'both', ['off', 'on', 'both'], 'Fusion MoE setting(s) to time.',
                    flag_values=flag_values)
  flags.DEFINE_integer('dialogues', 120, 'Synthetic training dialogues to sample from.',
                       flag_values=flag_values)
  flags.DEFINE_integer(
      'equal_batch_utterances', 16, 'Also time every stage at the whole-dialogue batch closest to '
      'this many utterances a step (the authors\' batch: 16); 0: only the configured batch.',
      flag_values=flag_values)


MELD_TRAIN_UTTERANCES = 9989
MELD_EPOCHS = 30


def timed(call, n: int, warmup: int = 0) -> list[float]:
  """Seconds each of n calls of `call` took, after `warmup` untimed calls; `call` returns what to
  wait for (JAX dispatches asynchronously)."""
  times = []
  for i in range(-warmup, n):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    if i >= 0:
      times.append(time.perf_counter() - t0)
  return times


def measure_matmul_peak(n: int = 1024, repeats: int = 20) -> float:
  """fp32 FLOP/s of a large square matmul, median over repeats."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  return 2 * n ** 3 / statistics.median(timed(lambda: f(a, b), repeats, warmup=1))


@dataclasses.dataclass(frozen=True)
class Matmul:
  """One dot_general of a traced program: its operands (jaxpr variables, so that matmuls sharing an
  operand share it when timed alone too) and its parameters."""
  lhs: Any
  rhs: Any
  params: dict

  @property
  def flops(self) -> int:
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = self.params['dimension_numbers']
    lhs, rhs = self.lhs.aval.shape, self.rhs.aval.shape

    def free(shape, contract, batch):  # the product of the dims an operand keeps in the output
      return math.prod(n for i, n in enumerate(shape) if i not in contract and i not in batch)

    return (2 * math.prod(lhs[i] for i in lhs_batch) * math.prod(lhs[i] for i in lhs_contract)
            * free(lhs, lhs_contract, lhs_batch) * free(rhs, rhs_contract, rhs_batch))


def step_matmuls(jaxpr: jex.core.Jaxpr) -> list[Matmul]:
  """Every dot_general one run of `jaxpr` executes, once per execution: a scan's body counts
  `length` times and, of a cond's branches, the one with the fewest matmul FLOPs counts (the work
  the step cannot avoid). A while loop's trip count is not known, so matmuls inside one are an
  error."""
  found = []
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      found.append(Matmul(*eqn.invars, params=eqn.params))
    elif name == 'cond':
      found += min((step_matmuls(b.jaxpr) for b in eqn.params['branches']),
                   key=lambda ms: sum(m.flops for m in ms))
    else:
      inner = [m for sub in _sub_jaxprs(eqn) for m in step_matmuls(sub)]
      if inner and name == 'while':
        raise ValueError(f'{len(inner)} matmuls inside a while loop: its trip count is unknown')
      found += inner * (eqn.params['length'] if name == 'scan' else 1)
  return found


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(v, jex.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jex.core.Jaxpr):
        yield v


def matmuls_alone(matmuls: list[Matmul], seed: int = 0):
  """A jitted program running just `matmuls`, each on random operands of its shapes (one array per
  distinct operand), and those operands: the matmuls' own time, without anything else the step
  does around them."""
  operands = {}
  for m in matmuls:
    for v in (m.lhs, m.rhs):
      operands.setdefault(id(v), v.aval)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(operands))
  args = {name: jax.random.normal(k, aval.shape).astype(aval.dtype)
          for k, (name, aval) in zip(keys, operands.items())}

  @jax.jit
  def run(args):
    return [jax.lax.dot_general(args[id(m.lhs)], args[id(m.rhs)], **m.params) for m in matmuls]

  return run, args


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan')))


@dataclasses.dataclass
class StageBench:
  """One stage's compiled train step, its state and device batches, its input pipeline, and the
  timings collected so far."""
  label: str
  moe: bool
  step: Any  # the compiled train step
  state: Any
  frozen_states: Any
  class_weights: Any
  schedule_steps: Any
  device_batches: list
  dataset: Any  # the stage's input pipeline (a Grain MapDataset of host batches)
  flops: float
  params: int
  utterances_per_step: float
  # (jitted program, operands) running the step's matmuls alone (matmuls_alone); None on a mesh
  # of several devices, where the traced step's global shapes are not what one device computes.
  matmuls: Any
  matmul_flops: int
  update: Any  # the jitted parameter update alone (parameter_update)
  update_state: Any  # its own copy of the stage's state, donated to it
  grads: Any
  lower_s: float  # tracing and lowering the train step
  compile_s: float  # XLA compilation of the train step (short on a compilation-cache hit)
  batch: str = ''  # '' at the configured batch budget; '@16' at the equal batch (EqualBatch.tag)
  step_times: list = dataclasses.field(default_factory=list)
  pipeline_times: list = dataclasses.field(default_factory=list)
  matmul_times: list = dataclasses.field(default_factory=list)
  update_times: list = dataclasses.field(default_factory=list)

  def time_steps(self, n: int, warmup: int = 3) -> None:
    """Times n steps after `warmup` untimed ones (which bring this stage's arrays back into the
    caches after other stages ran)."""
    batches = itertools.cycle(self.device_batches)

    def step():
      self.state, metrics = self.step(self.state, next(batches), self.frozen_states,
                                      self.class_weights, self.schedule_steps)
      return metrics

    self.step_times += timed(step, n, warmup)

  def time_matmuls(self, n: int) -> None:
    """Times n runs of the step's matmuls alone, after one untimed run."""
    if self.matmuls is not None:
      run, operands = self.matmuls
      self.matmul_times += timed(lambda: run(operands), n, warmup=1)

  def time_update(self, n: int, warmup: int = 3) -> None:
    def update():
      self.update_state = self.update(self.update_state, self.grads, self.schedule_steps)
      return self.update_state

    self.update_times += timed(update, n, warmup)

  def time_pipeline(self, n: int) -> None:
    batches = itertools.cycle(range(len(self.dataset)))
    self.pipeline_times += timed(lambda: self.dataset[next(batches)], n)

  def row(self) -> dict:
    step_s = statistics.median(self.step_times)
    pipeline_s = statistics.median(self.pipeline_times)
    return {'stage': self.label, 'batch': self.batch, 'moe': self.moe, 'step_ms': 1e3 * step_s,
            'utterances_per_step': self.utterances_per_step,
            'examples_per_s': self.utterances_per_step / step_s, 'flops_per_step': self.flops,
            'flops_per_s': self.flops / step_s,
            'update_ms': 1e3 * statistics.median(self.update_times),
            'params': self.params, 'pipeline_ms': 1e3 * pipeline_s,
            'pipeline_vs_step': step_s / pipeline_s, 'matmul_flops': self.matmul_flops,
            'matmuls_ms': (1e3 * statistics.median(self.matmul_times) if self.matmul_times
                           else float('nan')),
            'lower_s': self.lower_s, 'compile_s': self.compile_s}


def prepare_stage(stage: str, ctx, trained, steps: int, label: str | None = None,
                  moe: bool = False, batch: str = '') -> StageBench:
  """Compiles the train step of `stage` for real batches from the pipeline and sets up the
  programs that run its matmuls and its parameter update alone; leaves a frozen model of the stage
  in `trained` for the stages that read it. `batch` tags the row of a non-default batch budget
  (ctx.config.batch is the budget either way)."""
  budget = sharding.batch_budget(ctx.config, ctx.mesh)
  run = stage_lib.StageRunner(stage, ctx, trained)
  ds = run.train_dataset(0)
  # One pass fills the record cache (config.data.cache_mib), as in every epoch but the first.
  for i in range(len(ds)):
    ds[i]
  host_batches = [ds[i % len(ds)] for i in range(steps)]
  batch_sh = sharding.batch_shardings(host_batches[0], ctx.mesh, budget)
  device_batches = [sharding.put_batch(b, batch_sh, budget) for b in host_batches]
  started = time.perf_counter()
  with cpu_backend.step_draws():  # as the stage's TimedCompile lowers it
    traced = run.jitted_train_step(batch_sh).trace(
        run.state, device_batches[0], *run.step_inputs)
    lowered = traced.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  lower_s, compile_s = lowered_at - started, time.perf_counter() - lowered_at
  matmuls = step_matmuls(traced.jaxpr.jaxpr)
  bench = StageBench(
      label=label or stage, moe=moe, step=compiled, state=run.state,
      frozen_states=run.frozen_states, class_weights=ctx.class_weights,
      schedule_steps=run.schedule_steps,
      device_batches=device_batches, dataset=ds, flops=_flops(compiled),
      params=sum(x.size for x in jax.tree.leaves(run.state.params)),
      utterances_per_step=statistics.mean(int(b.nodes['mask'].sum()) for b in host_batches),
      matmuls=matmuls_alone(matmuls) if ctx.mesh.size == 1 else None,
      matmul_flops=sum(m.flops for m in matmuls), lower_s=lower_s, compile_s=compile_s,
      batch=batch, **parameter_update(run))
  # Copies: the timing rounds go on donating this stage's own state to its step.
  frozen = jax.tree.map(jnp.copy, (bench.state.params, bench.state.model_state))
  trained[stage] = inference.FrozenModel(run.graphdef, (*frozen, run.rng_state))
  return bench


def parameter_update(run) -> dict:
  """The step's parameter side alone (clipping, optimizer, lr multipliers, EMA, accumulation) as a
  jitted function of (state, gradients), with a copy of the stage's state to donate to it and
  gradients of the parameters' shapes: StageBench's update fields. It does the same work whatever
  the batch."""
  update = jax.jit(functools.partial(steps_lib.apply_gradients, tx=run.tx,
                                     ema_decay=run.statics.ema_decay), donate_argnums=(0,))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), run.state.params)
  return {'update': update, 'update_state': jax.tree.map(jnp.copy, run.state), 'grads': grads}


def stacked_context(ctx, trained):
  """The fusion stage's context under stacking, from the benchmark's (briefly trained) encoders."""
  ctx = with_fusion_input(ctx, 'stacked')
  train = sources.InMemorySource(stacking.stacked_records(
      ctx.data.train, stacking.encoder_log_probs(ctx.data.train, trained, ctx.config, ctx.mesh)))
  return dataclasses.replace(ctx, data=dataclasses.replace(ctx.data, train=train, dev=train,
                                                           test=train))


def equal_batch_budget(lengths, utterances: float, max_nodes: int, max_graphs: int, *,
                       groups: int = 1, seed: int = 0, epochs: int = 5,
                       fits=lambda max_nodes, max_graphs: True) -> tuple[int, int, float]:
  """The whole-dialogue budget (max_nodes, max_graphs) whose training batches hold closest to
  `utterances` utterances a step on average, and that average.

  The rule: every budget that still holds the longest dialogue (max_nodes - 1 >= longest; one slot
  of each is padding), is no larger than the configured one (`max_nodes`, `max_graphs`) and
  `fits` (the mesh) is planned as the pipeline plans a training epoch (greedy packing of whole
  dialogues in the epoch's shuffled order, `pipeline.plan_dialogue_batches`; `groups` sub-batches
  a step), over the first `epochs` epochs' orders. The budget whose mean utterances per step is
  nearest `utterances` wins; ties go to fewer node slots (less padding computed), then fewer graph
  slots. The node budget cannot go below the longest dialogue, so the graph slots do most of the
  work: on MELD's lengths (9.6 utterances a dialogue, longest 33) one dialogue a batch averages
  about 10 utterances and two (max_graphs=3) about 19, so 16 gives max_graphs=3 and the smallest
  node budget, 34.
  """
  lengths = np.asarray(lengths, np.int64)
  total = int(lengths.sum())
  best = None
  for nodes in range(int(lengths.max()) + 1, max_nodes + 1):
    for graphs in range(2, max_graphs + 1):
      if not fits(nodes, graphs):
        continue
      budget = batch_contract.Budget(nodes, graphs)
      means = []
      for epoch in range(epochs):
        plan = pipeline.plan_dialogue_batches(
            lengths, budget, pipeline.epoch_order(len(lengths), seed, epoch))
        means.append(total / -(-len(plan) // groups))
      mean = statistics.mean(means)
      key = (abs(mean - utterances), nodes, graphs)
      if best is None or key < best[0]:
        best = (key, nodes, graphs, mean)
  if best is None:
    raise ValueError(f'no batch budget up to max_nodes={max_nodes}, max_graphs={max_graphs} holds '
                     f'the longest dialogue ({int(lengths.max())} utterances) and fits the mesh')
  return best[1:]


@dataclasses.dataclass(frozen=True)
class EqualBatch:
  """The batch budget of the equal-batch rows: `utterances` asked for, the budget chosen for it
  (equal_batch_budget) and the mean utterances a step its plan gives; under graph scope 'batch'
  (utterances shuffled across dialogues) the batch is `utterances` itself."""
  utterances: int
  max_nodes: int
  max_graphs: int
  planned: float
  scope: str = 'dialogue'

  @property
  def tag(self) -> str:
    return f'@{self.utterances}'

  @classmethod
  def for_context(cls, ctx, utterances: int) -> 'EqualBatch':
    config = ctx.config
    if config.graph.scope == 'batch':
      return cls(utterances, int(config.batch.max_nodes), 2, float(utterances), 'batch')
    data_axis, groups = sharding.data_axis_size(ctx.mesh), sharding.batch_groups(config)

    def fits(nodes, graphs):
      trial = config.copy_and_resolve_references()
      trial.batch.max_nodes, trial.batch.max_graphs = nodes, graphs
      try:
        config_validation.check_mesh_fits_batch(trial, data_axis, groups)
      except config_validation.ConfigError:
        return False
      return True

    nodes, graphs, planned = equal_batch_budget(
        ctx.data.train.dialogue_lengths, utterances, int(config.batch.max_nodes),
        int(config.batch.max_graphs), groups=groups, seed=config.seed, fits=fits)
    return cls(utterances, nodes, graphs, planned)

  def apply(self, ctx):
    """`ctx` with its config's batch budget set to this one."""
    config = ctx.config.copy_and_resolve_references()
    if self.scope == 'batch':
      config.batch.utterances_per_batch = self.utterances
    else:
      config.batch.max_nodes, config.batch.max_graphs = self.max_nodes, self.max_graphs
    return dataclasses.replace(ctx, config=config)

  def describe(self) -> str:
    if self.scope == 'batch':
      return (f'batches of {self.utterances} utterances shuffled across dialogues (graph scope '
              'batch)')
    return (f'batch.max_nodes={self.max_nodes}, batch.max_graphs={self.max_graphs}: the '
            f'whole-dialogue budget closest to {self.utterances} utterances a step '
            f'({self.planned:.1f} planned on the training split\'s dialogues)')


def main(argv):
  del argv
  cpu_backend.tune_for_cpu_backend()  # as mer_jax.main does
  base = errors.loaded_config(FLAGS['config'])
  print(f'devices: {jax.devices()}')
  settings = {'off': [False], 'on': [True], 'both': [False, True]}[FLAGS.moe]
  steps = FLAGS.steps
  benches = []
  equal = None  # the EqualBatch of the equal-batch rows (--equal_batch_utterances)
  with tempfile.TemporaryDirectory() as workdir:
    trained = {}
    for use_moe in settings:
      config = base.copy_and_resolve_references()
      config.unlock()
      config.data.synthetic.num_dialogues.train = FLAGS.dialogues
      config.data.synthetic.num_dialogues.dev = 4
      config.data.synthetic.num_dialogues.test = 4
      config.model.fusion.use_moe = use_moe
      config.train.progress_bar = False
      config.model.fusion.input = 'graph'
      ctx = job.prepare(config, workdir)
      if FLAGS.equal_batch_utterances and equal is None:
        equal = EqualBatch.for_context(ctx, FLAGS.equal_batch_utterances)
      if not trained:  # the encoders do not depend on the fusion's MoE setting
        benches += [prepare_stage(stage, ctx, trained, steps)
                    for stage in stages.ENCODER_STAGES]
        if equal is not None:
          # The same stages at the equal batch; their frozen models (the same weights whatever
          # the batch) go to a scratch copy, so `trained` keeps the default batch's.
          scratch = dict(trained)
          benches += [prepare_stage(stage, equal.apply(ctx), scratch, steps, batch=equal.tag)
                      for stage in stages.ENCODER_STAGES]
      # Fusion as it trains by default (stacked: inputs are the encoders' log-probabilities),
      # with the frozen encoders run inside every step (input 'graph') and on the raw features
      # (input 'raw', as the authors' fusion reads them).
      fusions = ((stacked_context(ctx, trained), {}, 'fusion'),
                 (ctx, trained, 'fusion(graph)'),
                 (with_fusion_input(ctx, 'raw'), {}, 'fusion(raw)'))
      for fusion_ctx, frozen, label in fusions:
        # A copy of the frozen models: prepare_stage adds the fusion's own to what it is given.
        benches.append(prepare_stage('fusion', fusion_ctx, dict(frozen), steps, label, use_moe))
        if equal is not None:
          benches.append(prepare_stage('fusion', equal.apply(fusion_ctx), dict(frozen), steps,
                                       label, use_moe, batch=equal.tag))
    folds = config.model.fusion.stacking_folds
    # Rounds over every stage in turn, so that a slow spell of this shared machine falls on all
    # of them rather than on one; each number below is a median over all rounds.
    peaks = []
    for _ in range(FLAGS.rounds):
      peaks.append(measure_matmul_peak())
      for bench in benches:
        bench.time_pipeline(steps)
        bench.time_steps(steps)
        bench.time_matmuls(steps)
        bench.time_update(steps)
  peak = statistics.median(peaks)
  # The configured batch's rows first, then the equal batch's.
  rows = sorted((b.row() for b in benches), key=lambda r: r['batch'] != '')
  width = max(13, *(len(r['stage'] + r['batch']) for r in rows))
  print(f'fp32 matmul peak (1024^3, median of {FLAGS.rounds} rounds x 20): {peak / 1e9:.1f} '
        f'GFLOP/s (rounds: {", ".join(f"{p / 1e9:.0f}" for p in peaks)})')
  print(f'{FLAGS.rounds} rounds x {steps} steps, input batches, matmul programs and updates '
        'per stage; medians')
  print(f'batch: rows without a tag at the configured budget (batch.max_nodes='
        f'{config.batch.max_nodes}, batch.max_graphs={config.batch.max_graphs}: whole dialogues)'
        + (f'; {equal.tag} rows at {equal.describe()}' if equal is not None else ''))
  print()
  print(f'{"stage":{width}} {"moe":5} {"step ms":>7} {"utt/step":>8} {"utt/s":>6} '
        f'{"GFLOP/step":>10} {"GFLOP/s":>7} {"% peak":>6} {"params M":>8} {"input ms":>8} '
        f'{"input x":>7} {"lower s":>7} {"compile s":>9}')
  for r in rows:
    print(f'{r["stage"] + r["batch"]:{width}} {str(r["moe"]):5} {r["step_ms"]:7.2f} '
          f'{r["utterances_per_step"]:8.1f} '
          f'{r["examples_per_s"]:6.0f} {r["flops_per_step"] / 1e9:10.3f} '
          f'{r["flops_per_s"] / 1e9:7.1f} {100 * r["flops_per_s"] / peak:6.1f} '
          f'{r["params"] / 1e6:8.2f} {r["pipeline_ms"]:8.2f} {r["pipeline_vs_step"]:7.1f} '
          f'{r["lower_s"]:7.2f} {r["compile_s"]:9.2f}')
  print()
  print('where a step\'s time goes: "matmul ms" times the step\'s matmuls alone, at their shapes, '
        'in one program; "update ms" its parameter side alone (clipping, AdamW, EMA, '
        'accumulation); "other ms" is the rest. "% peak, matmuls + update" is the step\'s FLOPs '
        'over those two times: the most it could reach if everything else were free.')
  if ctx.mesh.size > 1:
    print(f'(matmuls alone are timed only on a one-device mesh; this one has {ctx.mesh.size})')
  print(f'{"stage":{width}} {"moe":5} {"step ms":>7} {"matmul ms":>9} {"matmul % peak":>13} '
        f'{"update ms":>9} {"other ms":>8} {"% peak, matmuls + update":>24}')
  for r in rows:
    matmul_s = r['matmuls_ms'] / 1e3
    print(f'{r["stage"] + r["batch"]:{width}} {str(r["moe"]):5} {r["step_ms"]:7.2f} '
          f'{r["matmuls_ms"]:9.2f} '
          f'{100 * r["matmul_flops"] / matmul_s / peak:13.1f} {r["update_ms"]:9.2f} '
          f'{r["step_ms"] - r["matmuls_ms"] - r["update_ms"]:8.2f} '
          f'{100 * r["flops_per_step"] / (matmul_s + r["update_ms"] / 1e3) / peak:24.1f}')
  batches = [('', f'at the configured batch (batch.max_nodes={config.batch.max_nodes}, '
                  f'batch.max_graphs={config.batch.max_graphs}')]
  if equal is not None:
    batches.append((equal.tag, f'at the equal batch {equal.tag} (batch.max_nodes='
                               f'{equal.max_nodes}, batch.max_graphs={equal.max_graphs}'))
  for use_moe in settings:
    for tag, which in batches:
      at_batch = [r for r in rows if r['batch'] == tag]
      totals = projected_minutes(at_batch, use_moe, folds)
      measured = statistics.mean(r['utterances_per_step'] for r in at_batch
                                 if r['stage'] in stages.ENCODER_STAGES or r['moe'] == use_moe)
      print(f'projected full MELD run, {MELD_EPOCHS} epochs, moe={use_moe}, train steps only, '
            f'{which}: {measured:.1f} utterances a step, mean of its stages): '
            f'{totals["authors"]:.1f} min for the authors\' stages (teacher, students, fusion '
            f'on raw features; also ours with model.fusion.input=raw); {totals["default"]:.1f} '
            f'min for our default (stacked fusion, + {folds} cross-fitted encoder sets on '
            f'{folds - 1}/{folds} of the data): {totals["default"] / totals["authors"]:.2f}x')


def with_fusion_input(ctx, fusion_input: str):
  """`ctx` with its config's model.fusion.input set to `fusion_input`."""
  config = ctx.config.copy_and_resolve_references()
  config.model.fusion.input = fusion_input
  return dataclasses.replace(ctx, config=config)


def projected_minutes(rows: list[dict], use_moe: bool, folds: int) -> dict:
  """A full MELD run: 30 epochs of every stage at the measured step time and batch fill. Our
  default (stacked fusion) adds the cross-fitted encoders ((K - 1) / K of the data, K times); the
  authors' stage set has none, and its fusion reads the raw features."""
  seconds = {}
  for r in rows:
    if r['stage'] in stages.ENCODER_STAGES or r['moe'] == use_moe:
      steps_per_epoch = MELD_TRAIN_UTTERANCES / r['utterances_per_step']
      seconds[r['stage']] = MELD_EPOCHS * steps_per_epoch * r['step_ms'] / 1e3
  encoders = sum(seconds[s] for s in stages.ENCODER_STAGES)
  return {'default': (folds * encoders + seconds['fusion']) / 60,
          'authors': (encoders + seconds['fusion(raw)']) / 60}


def run(argv=None) -> None:
  """The `mer-jax-bench` console script."""
  cli.run_absl(main, doc=__doc__, define_flags=define_flags, argv=argv)


if __name__ == '__main__':
  run()
