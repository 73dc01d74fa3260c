r"""Paired inference speed of a PE-Dist student (the first N blocks) vs its teacher.

  python -m pyra_jax.experiments.pedist_speed --image_size=56 --batch=64 --rounds=20 \
      [--teacher_depth=12 --student_depth=6]

On the offline demo pair (docs/results.md, "PE-Dist"): the deployed models
(LoRA folded, eval mode) of `configs/demo.py:method=peft` at --teacher_depth
(default 12) and --student_depth (default 6) blocks, random weights of the right
shapes (speed does not depend on their values), timed round-robin with
`pyra_jax.throughput.round_robin` so that background load hits both alike.
Prints JSON: images/s of each, the paired median speed-up (median over rounds
of teacher time / student time), GFLOPs per image from our counter
(`schedules.vit_flops`, blocks only) and the load average before and after.
"""

from __future__ import annotations

import json

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pyra_jax import cli
from pyra_jax import schedules
from pyra_jax import throughput
from pyra_jax.configs import demo


# The command's flags, in their own FlagValues (main(argv) runs in-process too).
FLAGS = flags.FlagValues()
flags.DEFINE_integer('image_size', None, 'image size (px), a multiple of the patch '
                     'size 14', lower_bound=14, required=True, flag_values=FLAGS)
flags.DEFINE_integer('batch', None, 'images per call', lower_bound=1, required=True,
                     flag_values=FLAGS)
flags.DEFINE_integer('rounds', None, 'timed rounds', lower_bound=1, required=True,
                     flag_values=FLAGS)
flags.DEFINE_integer('teacher_depth', 12, "the teacher's blocks", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer('student_depth', 6, "the student's blocks (its first ones)",
                     lower_bound=1, flag_values=FLAGS)
cli.define_verbosity(FLAGS)


def main(argv: list[str] | None = None) -> None:
  """The command (argv without the program name; None: sys.argv[1:])."""
  cli.parse(FLAGS, argv, prog='python -m pyra_jax.experiments.pedist_speed', doc=__doc__)
  size, batch, rounds = FLAGS.image_size, FLAGS.batch, FLAGS.rounds
  if size % 14:
    cli.fail(f'--image_size={size}: give a multiple of the patch size 14, e.g. 56.',
             cli.USAGE_EXIT)
  depths = [FLAGS.teacher_depth, FLAGS.student_depth]
  calls, gflops = {}, {}
  for name, depth in zip(('teacher', 'student'), depths):
    c = demo.get_config('method=peft')
    c.model.image_size, c.model.num_classes, c.model.depth = size, 10, depth
    model, params = throughput.deployed(c.model, size, jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)),
                    jnp.float32)
    f = jax.jit(lambda p, x, m=model: m.apply({'params': p}, x, train=False))
    calls[name] = lambda f=f, p=params, x=x: f(p, x)
    n0 = (size // model.patch_size) ** 2 + 1
    gflops[name] = schedules.vit_flops(model.schedule, num_tokens=n0, width=model.width,
                                       mlp_ratio=model.mlp_dim / model.width) / 1e9
  load0 = open('/proc/loadavg').read().split()[:3]
  times = throughput.round_robin(calls, num_iters=rounds, min_seconds=0.0, warmup=1)
  load1 = open('/proc/loadavg').read().split()[:3]
  med = {k: float(np.median(v)) for k, v in times.items()}
  paired = float(np.median(np.asarray(times['teacher']) / np.asarray(times['student'])))
  print(json.dumps({
      'image_size': size, 'batch': batch, 'rounds': rounds, 'depths': depths,
      'load_before': load0, 'load_after': load1, 'gflops_per_image': gflops,
      'images_per_sec': {k: batch / v for k, v in med.items()},
      'speedup_student_over_teacher_paired_median': paired,
      'flops_ratio': gflops['teacher'] / gflops['student']}, indent=1))


if __name__ == '__main__':
  main()
