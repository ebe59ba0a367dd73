"""What a batch is, agreed between the input pipeline that builds it and the models that read it.

A batch is a padded `jraph.GraphsTuple` of static shape. Nodes are utterances; node fields:
'features' and 'present' (per modality), 'label' (-1: unlabeled or padding), 'speaker',
'position', 'mask' (real node), 'utterance' and 'record' (ids, for reports), and, for a student
distilled from a cached teacher, 'teacher_log_probs' and 'teacher_mask'. Edges carry their 'kind'.
Padding follows `jraph.pad_with_graphs`: every padding node and edge belongs to the first padding
graph, and each padding edge joins the first padding node to itself.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

# Edge kinds (edges['kind']): structural edges of a dialogue graph, and padding.
TEMPORAL_EDGE = 0
SPEAKER_EDGE = 1
PADDING_EDGE = -1
# Temporal edges: < 2 per node; same-speaker edges: < 2 per node.
EDGES_PER_NODE = 4


@dataclasses.dataclass(frozen=True)
class Budget:
  """Static batch shape. Slot counts include jraph's padding node and padding graph.

  A batch is `groups` sub-batches laid end to end, each packed on its own into `max_nodes` node
  and `max_graphs` graph slots; this process builds the sub-batches `local_groups`. A multi-host
  run has one group per JAX process, so each host reads only the dialogues of its own sub-batch.
  One group (the default) is one packed batch.
  """
  max_nodes: int
  max_graphs: int
  groups: int = 1
  local_groups: tuple[int, ...] = (0,)

  @property
  def max_edges(self) -> int:
    return EDGES_PER_NODE * self.max_nodes


def graph_slots(config) -> int:
  """Graph slots of a sub-batch: config.batch.max_graphs, or, for graph scope 'batch' (the whole
  batch is one graph), that graph and the padding graph."""
  return 2 if config.graph.scope == 'batch' else int(config.batch.max_graphs)


def budget_from_config(config, groups: int = 1, local_groups: Sequence[int] = (0,)) -> Budget:
  """The per-group budget from config.batch; `groups` sub-batches make one step."""
  return Budget(max_nodes=config.batch.max_nodes, max_graphs=graph_slots(config), groups=groups,
                local_groups=tuple(local_groups))
