"""Offline job: data, protocol, embedding pretraining, evaluation and (later) meta-training."""
