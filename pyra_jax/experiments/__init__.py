"""Tools for studies and measurements, built on the pyra_jax library.

The library (models, merging, training, data, checkpoints, benchmark) is what a
user fine-tunes and deploys with; this package holds what we use to measure it:

  study.py            runs a grid of training runs and summarises it
                      (python -m pyra_jax.experiments.study)
  study_small.py      the small-scale study's config: its training recipe and grid
  plots.py            accuracy against throughput from results files
                      (python -m pyra_jax.experiments.plots)
  input_benchmark.py  input-pipeline throughput, no model involved
                      (python -m pyra_jax.experiments.input_benchmark)
  knn_probe.py        k-NN accuracy of the converted ViT-S/14's features
                      (python -m pyra_jax.experiments.knn_probe)

The dependency goes one way: these import the library, the library never imports
this package (tests/test_layout.py checks it), so tooling needs such as
matplotlib stay out of training and deployment.
"""
