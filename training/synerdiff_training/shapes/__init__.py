"""Procedural "shapes" text-to-image data, a prompt-adherence scorer, and the training
recipe for the embedded default model (see docs/model.md)."""
