"""Training code for the embedded default model: the procedural shapes data set, its trainer,
evaluator and prompt-adherence scorer (`shapes`), and the tiny SD-shaped layout (`make_tiny`).
See docs/model.md."""
