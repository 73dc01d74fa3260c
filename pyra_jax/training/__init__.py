"""The trainer, one module per job.

  setup       the `Run` (model, parameters, mesh), `restore_run` of a checkpoint
  checks      config checks before anything is compiled (fields, batches, memory)
  steps       the training loss and step, the eval step, one evaluation pass
  loop        `train_and_evaluate`: restore or start, train, final results
              (imported by the commands only)
  evaluation  `evaluate_checkpoint`, two-stage evaluation, method cost reports
  records     results.json, read and written under a lock
  export      the deployable model (`export`, `load_export`, `evaluate_export`)
  teacher     PE-Dist's frozen teacher; distill: its loss terms
  search      DiffRate's rate search (`--mode=search`)

Nothing is imported here: `from pyra_jax.training import setup` loads what it
needs only.
"""
