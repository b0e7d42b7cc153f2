"""Data sets by name, augmentation policies and the reproducible pretraining pipeline."""
