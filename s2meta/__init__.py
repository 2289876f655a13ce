"""The `s2meta` command: `serve` runs the service (service/), every other command the
offline job (meta_training/). Each is imported only when asked for, so a serving install
never loads the training stack."""
