"""Real MELD, text path (frozen MiniLM utterance features): teacher, fusion(text) and the
ablations that apply, 5 seeds each. The features are computed once per run folder's text
settings (see configs/meld_text.py); every run of this sweep shares the same settings.

  python -m mer_jax.experiments.sweep --sweep configs/sweeps/meld_text.py --workdir /tmp/meld
"""

from configs import meld_text_ablations


def get_sweep():
  return {
      'title': 'MELD text path (frozen all-MiniLM-L6-v2 utterance features)',
      'reference': 'teacher',
      'seeds': 5,
      'overrides': (),
      'variants': {name: f'configs/meld_text_ablations.py:{name}'
                   for name in meld_text_ablations.VARIANTS},
  }
