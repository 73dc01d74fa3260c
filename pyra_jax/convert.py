r"""Converts a pretrained checkpoint once into pyra_jax's own layout.

  python -m pyra_jax.convert --src ViT-B_16.npz --out vitb16_in21k.npz
  python -m pyra_jax.convert --src hf-hub:timm/vit_base_patch16_224.orig_in21k \
      --out vitb16_in21k.npz
  python -m pyra_jax.convert --src model.safetensors --format dinov2_hf \
      --out dinov2_s14.npz

The output is an uncompressed .npz with our '/'-joined parameter paths and a
JSON entry `__pyra_jax__` (source format, model dims, how to resample its
position embeddings). Training then points `config.model_init` at it
(`model_init_format='pyra_jax'` or 'auto'): loading is a plain read, with no
name mapping, head splitting or ONNX parsing on every run. Position embeddings
stay at the checkpoint's grid; `load_pretrained` resamples them to the model's.

The conversion is as strict as `load_pretrained`: tensors no rule maps are an
error, tensors dropped on purpose (pre-training heads, decoders) are listed,
and weights holding NaN or inf are refused, naming the first such tensor.

The output is written under a temporary name and renamed when complete; an
error, Ctrl-C or SIGTERM removes the temporary file, so nothing is left
behind (only a SIGKILL can leave `<out>.partial`, which the next conversion
to the same --out overwrites).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings

from absl import flags
import numpy as np

from pyra_jax import cli
from pyra_jax import errors
from pyra_jax.checkpoints import common
from pyra_jax.checkpoints import hub
from pyra_jax.checkpoints import loader
from pyra_jax.checkpoints import npz

FORMAT_VERSION = 1


def describe(conv: common.Converted) -> dict:
  """The model dims a converted checkpoint implies (stored as metadata)."""
  p = conv.params
  kernel = p['embedding/kernel']
  blocks = loader.block_ids(p)
  b0 = 'Transformer/encoderblock_0/'
  prefix = 1 + ('dist' in p)
  n_grid = p[loader.POSEMB].shape[1] - prefix
  return {
      'format_version': FORMAT_VERSION,
      'source_format': conv.fmt,
      'width': int(kernel.shape[-1]),
      'patch_size': int(kernel.shape[0]),
      'depth': len(blocks),
      'num_heads': int(p[b0 + 'MultiHeadDotProductAttention_0/query/kernel'].shape[1]),
      'mlp_dim': int(p[b0 + 'MlpBlock_0/Dense_0/kernel'].shape[1]),
      'posemb_grid': int(round(np.sqrt(n_grid))),
      'num_prefix_tokens': prefix,
      'qkv_bias': b0 + 'MultiHeadDotProductAttention_0/query/bias' in p,
      'layerscale': b0 + 'LayerScale_0/scale' in p,
      'distilled': 'dist' in p,
      'posemb_method': conv.posemb_method,
      'heads_fixed': conv.heads_fixed,
      'task_params': sorted({
          k.split('/')[0] if k.startswith('head') else
          common.TASK_SCOPES.search(k).group(2)  # lora, adapter, ..., pyra
          for k in p if common.TASK_SCOPES.search(k)}),
  }


def convert(src: str, out: str, fmt: str = 'auto', num_heads: int | None = None,
            overwrite: bool = False) -> dict:
  """Reads `src`, writes `out` in our layout; returns the metadata written.

  Missing folders of `out` are created (what `--out runs/weights/x.npz` on a
  fresh machine means). `out` is checked before `src` is read, since reading
  a large checkpoint takes a while, and written under a temporary name that is
  renamed at the end, so an interrupted run never leaves a truncated `out`
  that the next run would refuse to overwrite.
  """
  _check_out(out, overwrite)
  conv = loader.read_checkpoint(src, fmt, num_heads=num_heads)
  if conv.fmt == 'pyra_jax':
    raise common.CheckpointError(f'{src} is already in the pyra_jax format.')
  if conv.unexpected:
    raise common.CheckpointError(
        f'{src} ({conv.fmt}) holds {len(conv.unexpected)} tensor(s) that no '
        f'conversion rule maps: {common.short_list(conv.unexpected)}. Is '
        '--format right?')
  for note in conv.notes:
    warnings.warn(note, common.CheckpointWarning)
  meta = describe(conv)
  # A Hub name says more than its cache file's name (always model.safetensors).
  meta['source'] = src if hub.is_hub_spec(src) else os.path.basename(src)
  meta['ignored'] = sorted(conv.ignored)[:50]
  _write_atomically(out, conv.params, meta)
  return meta


def _check_out(out: str, overwrite: bool) -> None:
  """Refuses an `out` that cannot be written, before any work is done."""
  if os.path.isdir(out):
    raise common.CheckpointError(
        f'--out {out} is a directory: give a file name, e.g. '
        f'--out {os.path.join(out, "converted.npz")}.')
  if os.path.exists(out) and not overwrite:
    raise common.CheckpointError(
        f'{out} already exists (converted once is enough; point '
        'config.model_init at it). Pass --overwrite to convert again.')
  nearest = os.path.dirname(os.path.abspath(out))
  while not os.path.exists(nearest):
    nearest = os.path.dirname(nearest)
  if not os.path.isdir(nearest):
    raise common.CheckpointError(
        f'--out {out}: {nearest} is a file, so the folder for the output '
        'cannot be created; choose another --out.')
  if not os.access(nearest, os.W_OK):
    raise common.CheckpointError(
        f'--out {out}: {nearest} is not writable; choose another --out.')


def _write_atomically(out: str, params: dict, meta: dict) -> None:
  """Writes `out` via a temporary file in the same folder, then renames it.

  Whatever stops the write (a full disk, Ctrl-C, SIGTERM via `main`, a bug)
  removes the temporary file before the exception goes on.
  """
  folder = os.path.dirname(os.path.abspath(out))
  partial = out + '.partial'
  try:
    os.makedirs(folder, exist_ok=True)
    npz.save_pyra_jax(partial, params, meta)
    os.replace(partial, out)
  except BaseException as e:
    if os.path.exists(partial):
      os.remove(partial)
    if isinstance(e, OSError):
      raise common.CheckpointError(
          f'Could not write {out} ({e.strerror or e}); nothing was written: '
          'free space or choose another --out.') from e
    raise


class _Terminated(KeyboardInterrupt):
  """SIGTERM, raised where the program is, so that clean-ups run."""


def _raise_terminated(signum, frame) -> None:
  del signum, frame
  raise _Terminated()


# The command's flags, in their own FlagValues: `main(argv)` is also called
# in-process (tests), beside other commands' flags.
FLAGS = flags.FlagValues()
flags.DEFINE_string('src', None, 'checkpoint to convert: a file or a Hub name, '
                    'hf-hub:<owner>/<repo>[/<file>][@<revision>]', flag_values=FLAGS,
                    required=True)
flags.DEFINE_string('out', None, 'output .npz', flag_values=FLAGS, required=True)
flags.DEFINE_enum('format', 'auto', ('auto',) + tuple(f for f in common.FORMATS
                                                     if f != 'pyra_jax'),
                  'the checkpoint format (auto: from the file)', flag_values=FLAGS)
flags.DEFINE_integer('num_heads', 0, 'heads to split fused PyTorch q/k/v into '
                     '(0: width // 64, right for timm/HF/MAE/DINOv2)', lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_bool('overwrite', False, 'replace an existing --out', flag_values=FLAGS)
cli.define_verbosity(FLAGS)


def main(argv: list[str] | None = None) -> int:
  """The command (argv without the program name; None: sys.argv[1:]); returns
  its exit status: 0, 1 for a user error (one `Error:` line), 130 / 143 when
  interrupted / terminated."""
  cli.parse(FLAGS, argv, prog='python -m pyra_jax.convert', doc=__doc__)
  args = FLAGS
  t0 = time.time()
  try:
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
  except ValueError:  # Not the main thread (main() called from a thread).
    previous = None
  try:
    meta = convert(args.src, args.out, args.format, args.num_heads or None,
                   args.overwrite)
  except errors.PyraError as e:  # CheckpointError, ConfigError, ...: one sentence
    cli.print_error(str(e))
    return 1
  except KeyboardInterrupt as e:
    how = 'terminated (SIGTERM)' if isinstance(e, _Terminated) else 'interrupted'
    cli.print_error(f'{how}: {args.out} was not written and nothing was left '
                    'behind; run the same command again to convert.')
    return 143 if isinstance(e, _Terminated) else 130
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  print(f'wrote {args.out} in {time.time() - t0:.1f}s: ' + ', '.join(
      f'{k}={v}' for k, v in meta.items() if k != 'ignored'))
  if meta['ignored']:
    print(f'dropped on purpose: {", ".join(meta["ignored"][:10])}'
          f'{" ..." if len(meta["ignored"]) > 10 else ""}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
