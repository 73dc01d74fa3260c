r"""Throughput, FLOPs and memory of the deployed models, side by side.

  python -m pyra_jax.benchmark --config=configs/vitb_high.py --out=bench.json
  python -m pyra_jax.benchmark --config=configs/vitb_low.py --mode=train
  python -m pyra_jax.benchmark --config=configs/vitb_high.py --peft=lora,adapter,convpass,fact,snf
  python -m pyra_jax.benchmark --config=configs/demo.py --curve --curve_png=curve.png

`--curve` (pyra_jax/speedup_curve.py) times schedules spread over each merging
method's family (PYRA: Eq. 8; ToMe: constant r) against the uncompressed model
and prints measured speed-up against FLOPs ratio: what each choice of
model.schedule='speedup:<x>' or 'flops:<ratio>' buys on this device.

Forward mode (default) builds, from one config, three deployed models (LoRA
folded into q/k/v with `fold_lora` + `deployed_config`, eval mode):

  peft  the uncompressed LoRA model (no merging),
  tome  ToMe with the config's schedule,
  pyra  PYRA with the config's schedule and modulation,

With `--peft=m1,m2,...` (forward mode) it builds each of these models for every
listed PEFT module (config model.peft), named `method[module]`, e.g.
`pyra[adapter]`, all timed in the same rounds; the speed-up is over the first
model (`peft[m1]`). LoRA and FacT fold into the frozen kernels; Adapter,
Convpass and SNF stay in the deployed model, so their cost shows here.

It compiles each once, warms up, then times forward passes *round-robin* (one pass
of each model per round, plus a reference matmul and the merge operations alone)
so background load on a shared machine hits them alike. Per model it reports the
median images/s, GFLOPs per image (our counter, `schedules.vit_flops`: blocks
only, as the paper), the speed-up over `peft` next to the FLOPs ratio, and the
fraction of the machine's matmul rate the model achieves: model FLOPs / time
divided by the FLOP rate of a square `--matmul_size` matmul of the same dtype
timed in the same rounds.

`--mode=train` times the training step a run executes: for each method it
builds the run `training.setup.setup` builds (random weights of the right shapes,
`model_init='random'`, the head sized by --num_classes when the config leaves
it unset) and calls `training.steps.make_train_step`'s memoised jitted step, fed its own
outputs, on a synthetic batch (image, label, mask): the real optimiser with its
lr groups and weight-decay mask, dropout, stochastic depth and the masked loss.
Per model it reports images/s, the paired speed-up over peft, the
step's FLOPs from XLA's cost analysis of the compiled step (the whole program:
dots count 2 per multiply-add, other ops 1 per output element, integer ops
of the RNG included, transcendentals such as exp and erf left out; forward,
backward, optimiser, patch embedding and head are all in) and the rate
achieved, and its peak memory: on GPU/TPU `device.memory_stats()`'s
`peak_bytes_in_use`; on CPU (no allocator statistics) the compiled step's
`memory_analysis()` (arguments + outputs + temporaries - aliased buffers), plus
the process's peak RSS. A breakdown splits the step into forward, RNG
(dropout and stochastic-depth masks), backward and optimiser by timing, in the
same rounds, separately compiled programs on the same inputs and subtracting
(`TrainStepCalls`); it is not a profile.

A jitted function counts its traces with a Python side effect; a trace after the
first call means a recompilation, which is reported (and `recompiled: true` in
the JSON). Train mode counts the real step's compilations from its jit cache
(the step is training's own function, so it cannot be wrapped).

JSON written by `--out` (one object):
  mode, config (the config file's model section), machine (platform, device
  kind, cpu count, jax version), load_average (before, after), settings
  (batch_size, dtype, image_size, warmup, rounds, seconds),
  matmul {size, seconds, gflops_per_s, gflops_per_s_best, round_seconds},
  models {peft|tome|pyra: {method, schedule, tokens, gflops (per image),
          images_per_sec, seconds (median per batch), seconds_iqr, seconds_best,
          speedup, speedup_of_medians, flops_ratio, speedup_over_flops_ratio,
          gflops_per_s, matmul_fraction, matmul_fraction_of_medians, traces,
          recompiled, round_seconds (every timed call, in round order),
          [train: peak_bytes, peak_source, memory_analysis, flops_source,
          forward_gflops_blocks (our counter), breakdown {forward, rng,
          backward, optimizer, sum, step (seconds per batch), method},
          breakdown_gflops {step, fwd_bwd, forward, forward_no_rng}]}},
  merge_ops {model, seconds, share_of_model} (forward mode, when something
  merges), pyra_cost_over_tome (1 - paired tome/pyra time ratio), recompiled.

Speed-ups and matmul fractions are *paired*: the median over rounds of the
ratio within each round, which cancels load that hits a whole round.

The package, by job: `forward` (forward mode and the merge-ops share), `gemm`
(the dense-layer ceiling), `train_step` (train mode and its breakdown),
`formatting` (the console tables), `command` (flags and the program). The
timing itself (deployed models, round-robin rounds, paired medians) is the
library's `pyra_jax.throughput`, which training and `vtab` use; nothing in the
library imports this tool.
"""

from pyra_jax.benchmark.command import PRESETS, check_flags, define_flags, main, run, settings_from_flags
from pyra_jax.benchmark.formatting import format_profiles, format_table
from pyra_jax.benchmark.forward import merge_ops_call, run_forward
from pyra_jax.benchmark.gemm import dense_layers_call, gemm_bound
from pyra_jax.benchmark.train_step import (BENCH_STEPS_PER_EPOCH, TrainStepCalls, run_train,
                                           synthetic_batch, train_run)
from pyra_jax.errors import BenchmarkError
from pyra_jax.throughput import DEFAULT_METHODS, METHODS

__all__ = ['BENCH_STEPS_PER_EPOCH', 'BenchmarkError', 'DEFAULT_METHODS', 'METHODS', 'PRESETS',
           'TrainStepCalls', 'check_flags', 'define_flags', 'dense_layers_call',
           'format_profiles', 'format_table', 'gemm_bound', 'main', 'merge_ops_call', 'run',
           'run_forward', 'run_train', 'settings_from_flags', 'synthetic_batch', 'train_run']
