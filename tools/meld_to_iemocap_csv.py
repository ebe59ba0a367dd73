"""Builds IEMOCAP-format CSVs from MELD dialogues, to exercise the generic dialogue-CSV path.

No IEMOCAP data is available here. This writes `{split}.csv` files with IEMOCAP's 6-class
schema (Dialogue_ID, Utterance_ID, Utterance, Speaker, Emotion; labels neutral, frustration,
sadness, anger, excited, happiness) from the first dialogues of each MELD split, relabelled:

  neutral -> neutral, sadness -> sadness, anger -> anger, joy -> happiness,
  surprise -> excited, disgust -> frustration, fear -> frustration.

  python tools/meld_to_iemocap_csv.py --meld ../shared/data/meld --out /tmp/iemocap_csv \
      --dialogues 300
"""

import argparse
import csv
import os

MELD_TO_IEMOCAP = {'neutral': 'neutral', 'sadness': 'sadness', 'anger': 'anger',
                   'joy': 'happiness', 'surprise': 'excited', 'disgust': 'frustration',
                   'fear': 'frustration'}


def convert(meld_csv: str, out_csv: str, max_dialogues: int) -> tuple[int, int]:
  with open(meld_csv, encoding='utf-8', newline='') as f:
    rows = list(csv.DictReader(f))
  kept_dialogues: list[str] = []
  out_rows = []
  for row in rows:
    d = row['Dialogue_ID']
    if d not in kept_dialogues:
      if len(kept_dialogues) >= max_dialogues:
        continue
      kept_dialogues.append(d)
    out_rows.append({'Dialogue_ID': f'Ses_meld{d}', 'Utterance_ID': row['Utterance_ID'],
                     'Utterance': row['Utterance'], 'Speaker': row['Speaker'],
                     'Emotion': MELD_TO_IEMOCAP[row['Emotion']]})
  os.makedirs(os.path.dirname(os.path.abspath(out_csv)), exist_ok=True)
  with open(out_csv, 'w', encoding='utf-8', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['Dialogue_ID', 'Utterance_ID', 'Utterance',
                                           'Speaker', 'Emotion'])
    writer.writeheader()
    writer.writerows(out_rows)
  return len(kept_dialogues), len(out_rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--meld', default='../shared/data/meld')
  parser.add_argument('--out', required=True)
  parser.add_argument('--dialogues', type=int, default=300, help='per split, at most')
  args = parser.parse_args()
  for split in ('train', 'dev', 'test'):
    n_d, n_u = convert(os.path.join(args.meld, f'{split}_sent_emo.csv'),
                       os.path.join(args.out, f'{split}.csv'), args.dialogues)
    print(f'{split}: {n_d} dialogues, {n_u} utterances -> {os.path.join(args.out, split)}.csv')


if __name__ == '__main__':
  main()
