"""Readers of the input forms (docs/data.md), each producing one `InteractionData`;
`meta_training.dataset.load_dataset` picks the reader by what exists at the path."""
