"""Orchestration: prepare a run's corpus (generate it, or extract features from transcripts or
clips), then train and evaluate every stage on it."""
