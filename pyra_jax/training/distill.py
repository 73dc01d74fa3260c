"""PE-Dist (the paper's Table 15): the distillation loss of a LoRA-tuned student.

PE-Dist compresses by distillation instead of token merging: a smaller backbone
(ViT-S/16 for ViT-B/16, ViT-B/16 for ViT-L/16) gets LoRA, and only LoRA and its
head train, on the task's cross-entropy plus a KL term towards a frozen teacher,
the larger backbone already PEFT-trained on the task (docs/algorithm.md §9;
the loss we chose where the paper is silent: §10).

The paper writes the loss as "CE + KL" and gives no temperature or weight; we
use Hinton et al.'s knowledge-distillation form, which is that loss at T = 1,
w = 1 (our defaults, `config.distill`):

  loss = CE(y, s) + w · T² · KL(softmax(t / T) ‖ softmax(s / T))

with s, t the student's and teacher's logits. The T² keeps the KL gradient's
scale independent of T (its gradient w.r.t. s shrinks as 1/T²), so w means
the same at any temperature.

The PYRA authors' code distils differently (`engine.py`, `train_one_epoch`):
the teacher's logits under no_grad, its top-1 class as a hard label, and

  loss = ½ · CE(y, s) + ½ · CE(argmax t, s)

each CE a batch mean (their `--smoothing` is 0 in their VTAB runs). That form
is `config.distill.loss = 'authors_hard'` (`hard_label_term`); it has no
temperature and no weight. Everything here is a pure function of arrays; the
teacher is restored in `training.teacher`, and its forward pass and the training
step are in `training.steps`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
# config.distill.loss: CE + w·T²·KL (ours) | the authors' code's hard-label form.
DISTILL_LOSSES = ('kl', 'authors_hard')


def kl_to_teacher(student_logits: Array, teacher_logits: Array,
                  temperature: float) -> Array:
  """KL(softmax(t/T) ‖ softmax(s/T)) per example, (B, C) -> (B,), float32.

  The teacher's distribution is the target: it is what the student should put
  its mass on. Computed from log-softmaxes (no log of a rounded-to-zero
  probability); terms where the teacher's probability is exactly 0 count 0.
  """
  s = student_logits.astype(jnp.float32) / temperature
  t = teacher_logits.astype(jnp.float32) / temperature
  log_p_s = jax.nn.log_softmax(s, axis=-1)
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  p_t = jnp.exp(log_p_t)
  return jnp.sum(jnp.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0), axis=-1)


def distillation_term(student_logits: Array, teacher_logits: Array,
                      temperature: float, weight: float) -> Array:
  """w · T² · KL(softmax(t/T) ‖ softmax(s/T)) per example, (B,).

  The teacher's logits get no gradient (`stop_gradient`): it is frozen.
  """
  kl = kl_to_teacher(student_logits, jax.lax.stop_gradient(teacher_logits),
                     temperature)
  return weight * temperature ** 2 * kl


def hard_label_term(student_logits: Array, teacher_logits: Array) -> Array:
  """CE(argmax t, s) per example, (B, C) -> (B,), float32.

  The teacher's top-1 class is the label (their `teach_output.topk(1)`; a tie
  goes to the lower class index, as argmax breaks it). Nothing flows back to
  the teacher: the label is an integer.
  """
  label = jnp.argmax(teacher_logits, axis=-1)
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_p_s, label[:, None], axis=-1)[:, 0]
