"""Cheap checks of a weight file before any parser reads it.

Parsers fail on a bad file in their own words: numpy says a random-bytes `.npz`
"contains pickled data", safetensors that its "header is too large", an empty
file gives an `EOFError`. None of that tells a user that the download did not
finish or that the path points at the wrong file. So before parsing we look at
what the file is: its size, its first bytes (the container's magic number)
and, for safetensors, its JSON header, which also tells us whether the file is
complete. Each failure is one sentence naming the file, what is wrong and what
to do. Reading whole tensors is left to the format modules; errors they still
raise (a zip damaged inside, say) are turned into the same kind of sentence by
`reading`.

A file this user may not read is a permission problem, reported as such (a
chmod fixes it, not a new download). A folder is not a weight file: the message
says what the folder is. An export of ours (`--mode=export`) is a fine-tuned
model with LoRA folded in, not a pretrained backbone, so it is refused as
model_init with the ways an export is used (evaluated with
`--mode=eval --export_dir`, benchmarked, or a distillation teacher via
config.distill.teacher_export); starting a new fine-tuning from one would stack
new adapters on a task-tuned backbone, which is rarely what was meant.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import zipfile
from typing import Iterable, Iterator

from pyra_jax.checkpoints import common

# Containers by extension; explicit formats imply theirs (see `container_of`).
NPZ, SAFETENSORS, TORCH, ONNX = 'npz', 'safetensors', 'torch', 'onnx'
TORCH_EXTS = ('.pth', '.pt', '.bin', '.ckpt')
# How to name the format setting in both entry points.
FORMAT_SETTING = 'model_init_format; `--format` for pyra_jax.convert'
_REFETCH = 'download or copy it again'
_ZIP_MAGIC = b'PK\x03\x04'
_EMPTY_ZIP_MAGIC = b'PK\x05\x06'
_NPY_MAGIC = b'\x93NUMPY'
_PICKLE_PROTOCOL_2_PLUS = b'\x80'
_ONNX_FIRST_BYTE = b'\x08'  # field 1 (ir_version, a varint) of a ModelProto.


def container_of(path: str, fmt: str) -> str | None:
  """The file container a format or, for 'auto', the extension implies."""
  ext = os.path.splitext(path)[1].lower()
  if fmt in ('npz', 'pyra_jax'):
    return NPZ
  if fmt == 'onnx_dinov2':
    return ONNX
  by_ext = {'.npz': NPZ, '.safetensors': SAFETENSORS, '.onnx': ONNX}
  by_ext.update({e: TORCH for e in TORCH_EXTS})
  if fmt == 'auto':
    return by_ext.get(ext)
  # timm / pyra_torch / dinov2_hf: safetensors or a torch pickle.
  return SAFETENSORS if ext == '.safetensors' else TORCH


def check_file(path: str, fmt: str) -> None:
  """Raises CheckpointError if `path` cannot be a `fmt` checkpoint.

  Args:
    path: an existing path (`read_checkpoint` reports missing ones).
    fmt: one of common.FORMATS or 'auto' (then the extension decides).
  """
  if os.path.isdir(path):
    raise common.CheckpointError(directory_message(path))
  size = os.path.getsize(path)
  if size == 0:
    raise common.CheckpointError(
        f'{path} is empty (0 bytes), so the download or copy did not finish: '
        f'{_REFETCH}.')
  container = container_of(path, fmt)
  try:
    with open(path, 'rb') as f:
      head = f.read(64)
  except PermissionError:
    raise common.CheckpointError(unreadable_message(path)) from None
  if container == NPZ:
    _check_npz(path, head)
  elif container == SAFETENSORS:
    _check_safetensors(path, head, size)
  elif container == TORCH:
    if not (head.startswith(_ZIP_MAGIC) or
            head.startswith(_PICKLE_PROTOCOL_2_PLUS)):
      raise common.CheckpointError(
          _not_a(path, 'PyTorch checkpoint (a zip archive or a pickle)', head))
  elif container == ONNX:
    if not head.startswith(_ONNX_FIRST_BYTE):
      raise common.CheckpointError(_not_a(path, 'ONNX model', head))


def unreadable_message(path: str) -> str:
  """The sentence for a weight file (or its folder) this user may not read."""
  return (f'{path} is not readable by this user (uid {os.geteuid()}): '
          f'permission denied; make it readable (e.g. chmod a+r {path}) or copy '
          'it somewhere this user can read.')


# Weight files by extension, to name the ones a folder holds.
_WEIGHT_EXTS = ('.npz', '.safetensors', '.onnx') + TORCH_EXTS


def directory_message(path: str) -> str:
  """Why a folder given as model_init (or `--src`) is not weights, and what to give.

  Tells apart the folders of ours a user may mistake for weights (an export,
  a training workdir or one of its checkpoints) from a download folder, whose
  weight files are named.
  """
  try:
    entries = set(os.listdir(path))
  except PermissionError:
    return unreadable_message(path)
  if {'params', 'config'} <= entries:
    return (f'{path} is a pyra_jax export (a fine-tuned model with LoRA folded '
            'in), not pretrained weights: evaluate it with --mode=eval '
            f'--export_dir={path}, benchmark it with python -m '
            f'pyra_jax.benchmark, or use it as a distillation teacher with '
            f'config.distill.teacher_export={path}; model_init takes the '
            'pretrained backbone (docs/usage.md, "Pretrained weights").')
  if {'params', 'meta'} <= entries or 'checkpoints' in entries:
    return (f'{path} is a pyra_jax training workdir or checkpoint, not '
            'pretrained weights: evaluate it with --mode=eval --workdir=..., '
            'export it with --mode=export, or use it as a distillation teacher '
            'with config.distill.teacher_workdir; model_init takes the '
            'pretrained backbone (docs/usage.md, "Pretrained weights").')
  weights = sorted(e for e in entries
                   if os.path.splitext(e)[1].lower() in _WEIGHT_EXTS)
  if weights:
    return (f'{path} is a directory, not a weight file: point model_init (or '
            f'`--src`) at the weight file inside it '
            f'({", ".join(os.path.join(path, w) for w in weights[:3])}'
            f'{", ..." if len(weights) > 3 else ""}).')
  return (f'{path} is a directory that holds no weight file '
          f'({", ".join(_WEIGHT_EXTS)}): point model_init (or `--src`) at the '
          'pretrained weights file (docs/usage.md, "Pretrained weights").')


def _check_npz(path: str, head: bytes) -> None:
  if head.startswith(_EMPTY_ZIP_MAGIC):
    raise common.CheckpointError(
        f'{path} is an .npz archive without any arrays: {_REFETCH}.')
  if head.startswith(_NPY_MAGIC):
    raise common.CheckpointError(
        f'{path} is a single .npy array (np.save), not an .npz archive of '
        'named tensors (np.savez): save the checkpoint with its tensor names '
        f'or {_REFETCH}.')
  if not head.startswith(_ZIP_MAGIC):
    raise common.CheckpointError(_not_a(path, '.npz archive', head))
  if not zipfile.is_zipfile(path):  # Reads only the archive's last bytes.
    raise common.CheckpointError(
        f'{path} starts like an .npz archive but its end (the zip directory) '
        f'is missing, so the file is truncated: {_REFETCH}.')


def _check_safetensors(path: str, head: bytes, size: int) -> None:
  """Layout: u64 little-endian header length N, N bytes of JSON, the data."""
  if size < 8:
    raise common.CheckpointError(
        f'{path} has {size} bytes, too few for a safetensors file (8 bytes of '
        f'header length come first): {_REFETCH}.')
  (n,) = struct.unpack('<Q', head[:8])
  if not head[8:9] == b'{' or n < 2:
    raise common.CheckpointError(_not_a(path, 'safetensors file', head))
  if n > size - 8:
    raise common.CheckpointError(
        f'{path} declares a {n}-byte safetensors header but holds only {size} '
        f'bytes, so it is truncated: {_REFETCH}.')
  with open(path, 'rb') as f:
    f.seek(8)
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except ValueError:
    header = None
  if not isinstance(header, dict):
    raise common.CheckpointError(
        f'{path}: the safetensors header is not valid JSON, so the file is '
        f'damaged: {_REFETCH}.')
  data_bytes = size - 8 - n
  ends = [entry['data_offsets'][1] for name, entry in header.items()
          if name != '__metadata__' and isinstance(entry, dict)
          and isinstance(entry.get('data_offsets'), list)
          and len(entry['data_offsets']) == 2]
  if ends and max(ends) > data_bytes:
    raise common.CheckpointError(
        f'{path} is truncated: its tensors need {max(ends)} bytes of data but '
        f'the file holds {data_bytes}: {_REFETCH}.')


def _not_a(path: str, what: str, head: bytes) -> str:
  """'<path> is not a <what>' plus what the first bytes suggest it is."""
  seems = sniff(head)
  article = 'an' if what[0] in 'aeiou.AEIOU' else 'a'
  return (f'{path} is not {article} {what}' +
          (f'; it looks like {seems}' if seems else '') +
          f': check the path, set the format ({FORMAT_SETTING}) if the '
          f'extension is wrong, or {_REFETCH}.')


def sniff(head: bytes) -> str | None:
  """What a file's first bytes suggest it is, in words; None if unknown."""
  text = head.lstrip()[:15].lower()
  if text.startswith((b'<!doctype html', b'<html', b'<?xml')):
    return 'a web page (a failed download, e.g. a login or error page)'
  if head.startswith(_ZIP_MAGIC):
    return 'a zip archive (an .npz or a PyTorch .pth)'
  if head.startswith(_NPY_MAGIC):
    return 'a single .npy array'
  if len(head) > 8 and head[8:9] == b'{':
    return 'a safetensors file'
  if head.startswith(_PICKLE_PROTOCOL_2_PLUS):
    return 'a Python pickle (a PyTorch .pth)'
  if head.startswith(b'version https://git-lfs'):
    return 'a Git LFS pointer (run `git lfs pull` to fetch the real file)'
  return None


# Names that tell which family a set of tensors comes from.
_FAMILIES = (
    (re.compile(r'(^|[./])patch_embed\.proj\.weight$'),
     'a PyTorch timm-style ViT (format timm or pyra_torch, saved as '
     '.safetensors or .pth)'),
    (re.compile(r'embeddings\.patch_embeddings\.projection\.weight$'),
     'a Hugging Face DINOv2 model (format dinov2_hf, saved as .safetensors)'),
    (re.compile(r'(^|/)embedding/kernel$'),
     'a google-research/vision_transformer ViT (format npz)'),
)


def what_names_suggest(names: Iterable[str]) -> str:
  """A phrase saying what a set of tensor names looks like."""
  names = sorted(names)
  for rx, family in _FAMILIES:
    if any(rx.search(n) for n in names):
      return family
  if names and all(re.fullmatch(r'arr_\d+', n) for n in names):
    return (f'{len(names)} unnamed arrays (np.savez without names), not a '
            'checkpoint')
  return (f'{len(names)} tensor(s) of something other than a ViT (first: '
          f'{common.short_list(names, 5)})')


@contextlib.contextmanager
def reading(path: str, what: str) -> Iterator[None]:
  """Turns a parser's own exception for a damaged file into one sentence.

  `check_file` catches most bad files by their first bytes; what remains (a
  zip damaged inside, an array stored as a Python object, a protobuf cut
  short) is still the file's fault, not the user's code's, so it gets the same
  kind of message.
  """
  try:
    yield
  except common.CheckpointError:
    raise
  except _file_errors() as e:
    raise common.CheckpointError(_damaged(path, what, e)) from e


def _file_errors() -> tuple[type[BaseException], ...]:
  """What the parsers raise for a bad file (anything else is a bug of ours)."""
  from google.protobuf.message import DecodeError  # pylint: disable=g-import-not-at-top
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  return (OSError, EOFError, ValueError, zipfile.BadZipFile, SafetensorError,
          DecodeError)


def _damaged(path: str, what: str, e: BaseException) -> str:
  if isinstance(e, PermissionError):
    return unreadable_message(path)
  reason = ' '.join(str(e).split())[:160] or type(e).__name__
  return (f'{path} could not be read as {what} ({reason}); the file is damaged '
          f'or not {what}: {_REFETCH}, or set the format ({FORMAT_SETTING}).')
