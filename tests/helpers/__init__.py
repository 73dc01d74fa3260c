"""Code the test modules share (test modules never import one another).

  cli          the command line in this process (`run_main`, `run_tiny`) or a
               subprocess (`cli`), the one-sentence error check, the TINY run.
  models       `tiny_config`, the one builder of a tiny config, its presets
               (`tiny_model`, `tiny_run_config`, `quick_vtab_config`), inputs,
               initialised and random parameters.
  data         the offline-MNIST requirement, VTAB-style split folders, fake TFDS
               examples.
  runs         what a finished run left: checkpoint steps, parameters, losses.
  checkpoints  the tiny model of the checkpoint-format tests and element-wise checks.
  reference_*  numpy transcriptions (ViT, merging, PEFT modules, token-reduction
               methods) that the model is checked against.

Shared fixtures (the tiny run trained once per session) are in tests/conftest.py.
"""
