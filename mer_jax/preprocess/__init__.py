"""Preprocessing: raw dialogues (CSV transcripts) -> feature shards the core trains on."""
