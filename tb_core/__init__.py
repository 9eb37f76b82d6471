"""Shared base of both packages: strict configs, error kinds and safe file writes.

It imports neither DeepSpeed nor the model, so `tb_model` (usable on its own to load and sample a trained
model) and `tb_train` (the jobs) can both depend on it without an import cycle.
"""
