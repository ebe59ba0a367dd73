"""Token sequences for the text encoder: single utterances and speaker-tagged context prompts.

The context prompt of utterance i of a dialogue (SPEC stage 3):

    [bos] <sA> u_0 <sB> u_1 ... <sK> u_i [sep] Now <sK> feels [mask]

`<sK>` is the speaker token of K = the speaker's rank by first appearance in the dialogue,
1-based (the authors sort speaker names alphabetically instead; first appearance is stable
when a dialogue is cut short and matches the shards' `speaker_ids`). Prompts longer than
`max_length` are truncated on the left of the body: the `[sep] Now <sK> feels [mask]` marker
and the end of the target utterance are always kept, the earliest context goes first. The
encoder reads the representation at the last position (the mask token).

Assembly works on token ids (each utterance is tokenised once per dialogue), so it is the same
for BERT- and RoBERTa-style tokenizers; `PromptTokenizer` supplies the ids.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def speaker_token(rank: int) -> str:
  """The added token of the speaker with 0-based rank `rank` (`<s1>` for rank 0)."""
  return f'<s{rank + 1}>'


@dataclasses.dataclass(frozen=True)
class PromptIds:
  """The fixed token ids a prompt is assembled from."""

  speaker_ids: tuple[int, ...]  # id of <s1>, <s2>, ...
  bos: tuple[int, ...]  # () or (cls/bos id,)
  sep: tuple[int, ...]
  now: tuple[int, ...]
  feels: tuple[int, ...]
  mask: int
  eos: tuple[int, ...]  # closes a single-utterance sequence ([SEP] or </s>)

  def marker(self, rank: int) -> list[int]:
    return [*self.sep, *self.now, self.speaker_ids[rank], *self.feels, self.mask]


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One token sequence and where the target utterance's tokens lie in it."""

  ids: np.ndarray  # int32[L]
  target_start: int  # [target_start, target_end) indexes the target utterance's own tokens
  target_end: int

  def __len__(self) -> int:
    return len(self.ids)


def context_prompts(utterance_ids: Sequence[Sequence[int]], speaker_ranks: Sequence[int],
                    prompt_ids: PromptIds, max_length: int) -> list[Prompt]:
  """The context prompt of every utterance of one dialogue.

  Args:
    utterance_ids: per utterance, its token ids (no special tokens).
    speaker_ranks: per utterance, its speaker's 0-based rank in the dialogue.
    prompt_ids: special and marker token ids.
    max_length: the longest sequence allowed, all tokens included.
  """
  if len(utterance_ids) != len(speaker_ranks):
    raise ValueError(f'{len(utterance_ids)} utterances but {len(speaker_ranks)} speaker ranks')
  most = int(max(speaker_ranks, default=-1)) + 1
  if most > len(prompt_ids.speaker_ids):
    raise ValueError(f'the dialogue has {most} speakers but only '
                     f'{len(prompt_ids.speaker_ids)} speaker tokens exist; raise '
                     'text.max_speakers')
  fixed = len(prompt_ids.bos) + len(prompt_ids.marker(0))
  if max_length <= fixed:
    raise ValueError(f'max_length={max_length} leaves no room for text after the '
                     f'{fixed} prompt tokens')
  budget = max_length - fixed
  body: list[int] = []
  prompts = []
  for ids, rank in zip(utterance_ids, speaker_ranks):
    body.extend([prompt_ids.speaker_ids[rank], *ids])
    kept = body[-budget:]
    target_len = min(len(ids), len(kept))
    start = len(prompt_ids.bos) + len(kept) - target_len
    sequence = [*prompt_ids.bos, *kept, *prompt_ids.marker(rank)]
    prompts.append(Prompt(np.asarray(sequence, np.int32), start, start + target_len))
  return prompts


def utterance_sequence(ids: Sequence[int], prompt_ids: PromptIds, max_length: int) -> Prompt:
  """`[bos] utterance [eos]`, the utterance cut on the right to fit `max_length`."""
  room = max_length - len(prompt_ids.bos) - len(prompt_ids.eos)
  if room < 1:
    raise ValueError(f'max_length={max_length} leaves no room for text')
  kept = list(ids)[:room]
  start = len(prompt_ids.bos)
  return Prompt(np.asarray([*prompt_ids.bos, *kept, *prompt_ids.eos], np.int32), start,
                start + len(kept))


class PromptTokenizer:
  """A Hugging Face tokenizer with the speaker tokens added, producing `Prompt`s.

  Adding `<s1>`..`<sN>` grows the vocabulary: the encoder's word embeddings must be resized to
  `vocab_size` (new rows start at the mean embedding).
  """

  def __init__(self, tokenizer, max_speakers: int):
    if max_speakers < 1:
      raise ValueError(f'max_speakers must be >= 1, got {max_speakers}')
    self.tokenizer = tokenizer
    names = [speaker_token(r) for r in range(max_speakers)]
    tokenizer.add_special_tokens({'additional_special_tokens': names})
    speaker_ids = tuple(tokenizer.convert_tokens_to_ids(n) for n in names)
    if len(set(speaker_ids)) != max_speakers or tokenizer.unk_token_id in speaker_ids:
      raise ValueError(f'the tokenizer did not add distinct speaker tokens: {speaker_ids}')
    for role in ('mask', 'sep'):
      if getattr(tokenizer, f'{role}_token_id') is None:
        raise ValueError(f'the tokenizer has no {role} token; context prompts need one')
    bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    # Byte-level BPE (RoBERTa) marks a word's leading space inside the token: tokenise each
    # utterance as it appears mid-sequence, after a space.
    self._space_prefix = tokenizer.tokenize(' word') != tokenizer.tokenize('word')
    self.ids = PromptIds(
        speaker_ids=speaker_ids, bos=() if bos is None else (int(bos),),
        sep=(int(tokenizer.sep_token_id),), now=tuple(self.encode(['Now'])[0]),
        feels=tuple(self.encode(['feels'])[0]), mask=int(tokenizer.mask_token_id),
        eos=(int(tokenizer.sep_token_id),))

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  @property
  def pad_id(self) -> int:
    return int(self.tokenizer.pad_token_id)

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens."""
    if not texts:
      return []
    if self._space_prefix:
      texts = [' ' + t for t in texts]
    return [list(ids) for ids in
            self.tokenizer(list(texts), add_special_tokens=False)['input_ids']]

  def dialogue_prompts(self, transcripts: Sequence[str], speaker_ranks: Sequence[int], *,
                       context: bool, max_length: int) -> list[Prompt]:
    """One `Prompt` per utterance: the context prompt, or the utterance alone."""
    ids = self.encode(transcripts)
    if context:
      return context_prompts(ids, speaker_ranks, self.ids, max_length)
    return [utterance_sequence(u, self.ids, max_length) for u in ids]
