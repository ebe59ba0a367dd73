"""The stage vocabulary: which stages exist, what each reads, and what each needs trained first.

A run trains the text teacher, then the audio and visual students (distilled from the frozen
teacher), then fusion. Every module that names a stage, its modality, its seed or the frozen
stages it depends on asks this one.
"""

from __future__ import annotations

from typing import Sequence

MODALITIES = ('t', 'a', 'v')
ENCODER_STAGES = ('teacher', 'audio', 'visual')
STAGES = ENCODER_STAGES + ('fusion',)
MODALITY_OF_STAGE = {'teacher': 't', 'audio': 'a', 'visual': 'v'}
ENCODER_OF_MODALITY = {m: s for s, m in MODALITY_OF_STAGE.items()}
# Added to config.seed, so the stages of one run start from different random streams.
SEED_OFFSET = {'teacher': 0, 'audio': 1, 'visual': 2, 'fusion': 3}
FUSION_INPUTS = ('stacked', 'graph', 'raw')
STUDENT_STAGES = ('audio', 'visual')


def seed_of(stage: str, seed: int) -> int:
  """The seed a stage of a run with config.seed `seed` initialises and trains with."""
  return int(seed) + SEED_OFFSET[stage]


def is_encoder(stage: str) -> bool:
  return stage in MODALITY_OF_STAGE


def modalities_read(stage: str, modalities: Sequence[str]) -> tuple[str, ...]:
  """The modalities of `modalities` (the run's) whose inputs `stage` reads to predict: an
  encoder its own, fusion every one (through the frozen encoders or directly)."""
  return (MODALITY_OF_STAGE[stage],) if is_encoder(stage) else tuple(modalities)


def encoders_of(modalities: Sequence[str]) -> tuple[str, ...]:
  """The encoder stages of `modalities`, in their order."""
  return tuple(ENCODER_OF_MODALITY[m] for m in modalities)


def stages_for(modalities: Sequence[str]) -> tuple[str, ...]:
  """Every stage of a run over `modalities`: their encoders in training order, then fusion."""
  return tuple(s for s in ENCODER_STAGES if MODALITY_OF_STAGE[s] in modalities) + ('fusion',)


def distills(stage: str, distill: bool) -> bool:
  """Whether `stage` learns from the frozen teacher (config.loss.distill)."""
  return bool(distill) and stage in STUDENT_STAGES


def prerequisites(stage: str, *, distill: bool, fusion_input: str,
                  modalities: Sequence[str]) -> tuple[str, ...]:
  """The stages that must be trained before `stage`: the teacher for a distilling student; for
  fusion on encoder outputs ('graph' or 'stacked'), the encoder of every modality it reads."""
  if stage == 'teacher':
    return ()
  if stage in STUDENT_STAGES:
    return ('teacher',) if distills(stage, distill) else ()
  if fusion_input == 'raw':
    return ()
  return encoders_of(modalities)


def frozen_in_step(stage: str, *, distill: bool, fusion_input: str, modalities: Sequence[str],
                   teacher_in_batch: bool = False) -> tuple[str, ...]:
  """The frozen stages a stage's train and predict steps run: its prerequisites, less those whose
  outputs arrive precomputed in the batch (the cached teacher; stacked fusion's log-probabilities).
  """
  if stage == 'fusion' and fusion_input == 'stacked':
    return ()
  needed = prerequisites(stage, distill=distill, fusion_input=fusion_input, modalities=modalities)
  return tuple(n for n in needed if not (n == 'teacher' and teacher_in_batch))
