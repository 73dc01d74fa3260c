"""The VTAB-1k folder layout that NOAH, VPT and PYRA users hold on disk.

    <root>/<task>/<split>.txt          split in train800, val200, train800val200, test
    <root>/<task>/images/<split>/NNNNNN.jpg

Each line of a split file is `<path> <label>`, the path relative to
`<root>/<task>`. The task directory may carry any of the task's folder names
(`cifar` or `cifar100`, `oxford_iiit_pet` or `oxford_pet`, `kitti`, ...), and
`<root>` may also be the task directory itself.

A dataset of one's own (task `folder:NAME`, `custom_task`) uses the same
layout in `<root>/NAME`, with any split names (`train.txt` is the split
`train`). Its class count is the number of lines of `NAME/classes.txt` (one
class name per line) when that file exists; otherwise max label + 1 over all
its split files (every `*.txt` but classes.txt), so that every split of the
folder agrees on the head's size. Without classes.txt, a class no image
carries is refused: it usually means labels counted from 1.

The whole split file is parsed and checked up front, so a broken folder fails
before training starts, naming the file and `<split>.txt:<line>`, rather than
an hour in (a bad test image would otherwise surface only after training):
  * labels are integers in range;
  * paths stay inside the task folder: no absolute paths and no `..` that
    climbs out of it. Symbolic links are followed, not refused: linking
    `images/` to another disk is a common way to lay out a dataset, and a
    link is placed by whoever owns the folder, not by a line of a split file;
  * every image exists and is one TensorFlow decodes: its header is read
    (PIL's lazy open, which decodes no pixels) and a JPEG or PNG must end
    with its end marker, which catches files cut short. Any image these
    cheap checks doubt is decoded in full by the pipeline's own decoder, which
    has the last word, so a valid image is never refused. On the real
    CIFAR-10 test split (10,000 JPEGs) the checks take about a second.
An image that passes these checks and still fails to decode (damaged inside)
is found and named when the pipeline hits it (`locate_unreadable`).

Split files and classes.txt are UTF-8 text; a byte-order mark at the start
(Windows editors write one) is accepted, and bytes that are not UTF-8 are
reported with their line. A file the user running training may not read (an
image, a split file) is reported as a permission problem, not as missing or
damaged: the fix is a `chmod`, not a new download.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError
from pyra_jax.data.tf_import import tf

from pyra_jax.data.errors import DataError
from pyra_jax.data.tasks import CUSTOM_PREFIX, SPLITS, Task, custom_folder_name


def find_task_dir(root: str | os.PathLike, task: Task) -> Path:
  """`<root>/<folder name>`, or `root` itself if it holds the split files."""
  root = Path(root).expanduser()
  if not str(root) or not root.is_dir():
    raise DataError(
        f'VTAB-1k folder root {str(root)!r} is not a directory: set '
        f'config.data.data_dir to the folder that holds '
        f'{"/ or ".join(task.folder_names)}/.')
  for name in task.folder_names:
    if (root / name).is_dir():
      return root / name
  if (root.name in task.folder_names
      or any((root / f'{split}.txt').is_file() for split in SPLITS)):
    return root  # Pointed at the task directory itself.
  raise DataError(
      f'No folder for task {task.name!r} in {root}: expected one of '
      f'{", ".join(str(root / n) for n in task.folder_names)}.')


@dataclasses.dataclass(frozen=True)
class Listed:
  """One image of a split file: its absolute path, label, and where it is listed."""
  path: str
  label: int
  where: str  # '<task_dir>/<split>.txt:<line>'


CLASSES_FILE = 'classes.txt'


_BOM = b'\xef\xbb\xbf'
_UTF16_BOMS = (b'\xff\xfe', b'\xfe\xff')


def unreadable_message(path: str | os.PathLike, what: str) -> str:
  """The sentence for a file this user may not read (a chmod fixes it)."""
  return (f'{what} {path} is not readable by this user (uid {os.geteuid()}): '
          f'permission denied; make it readable (e.g. chmod a+r {path}) or run '
          "as the file's owner.")


def _text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
  """(line number, text) of each line of a UTF-8 text file (BOM accepted).

  Read as bytes and decoded line by line, so that bytes that are not UTF-8
  are reported with their line instead of as a UnicodeDecodeError.
  """
  try:
    data = path.read_bytes()
  except PermissionError:
    raise DataError(unreadable_message(path, what)) from None
  except OSError as e:
    raise DataError(f'{what} {path} cannot be read ({e.strerror or e}).'
                    ) from None
  if data.startswith(_UTF16_BOMS):
    raise DataError(f'{what} {path} is UTF-16 text: save it as UTF-8.')
  if data.startswith(_BOM):
    data = data[len(_BOM):]
  for line_no, raw in enumerate(data.splitlines(), start=1):
    try:
      yield line_no, raw.decode('utf-8')
    except UnicodeDecodeError as e:
      raise DataError(
          f'{path}:{line_no}: byte 0x{raw[e.start]:02x} at column '
          f'{e.start + 1} is not UTF-8: save {path.name} as UTF-8 text (e.g. '
          f'iconv -f latin1 -t utf-8), or fix the line.') from None


def _split_lines(split_file: Path) -> Iterator[tuple[str, str, int]]:
  """(where, image path as written, label) of each non-empty line."""
  for line_no, line in _text_lines(split_file, 'Split file'):
    line = line.strip()
    if not line:
      continue
    parts = line.rsplit(maxsplit=1)  # Paths may contain spaces; labels not.
    where = f'{split_file}:{line_no}'
    if len(parts) != 2:
      raise DataError(f'{where}: expected "<image path> <label>", '
                      f'got {line!r}.')
    try:
      label = int(parts[1])
    except ValueError:
      raise DataError(f'{where}: label {parts[1]!r} is not an integer.'
                      ) from None
    yield where, parts[0], label


# Permission problems, reported apart from damage: a chmod fixes them.
_DENIED = 'cannot be read: permission denied'
_DENIED_FOLDER = 'cannot be reached: permission denied on a folder of its path'
# The permission problems `file_problem` and `image_problem` report.
PERMISSION_PROBLEMS = (_DENIED, _DENIED_FOLDER)
# What a split line may name instead of an image file, by `stat` file type.
_NOT_FILES = ((stat.S_ISDIR, 'a directory'), (stat.S_ISFIFO, 'a named pipe (FIFO)'),
              (stat.S_ISSOCK, 'a socket'), (stat.S_ISCHR, 'a character device'),
              (stat.S_ISBLK, 'a block device'))


def file_problem(path: Path) -> str | None:
  """Why `path` is not a regular file one can read, or None if it is one.

  `Path.is_file` answers "does not exist" for a directory, a FIFO or a path
  behind a folder one may not enter; each gets its own words here.
  """
  try:
    mode = os.stat(path).st_mode
  except PermissionError:
    return _DENIED_FOLDER
  except (FileNotFoundError, NotADirectoryError):
    return 'does not exist'
  except OSError as e:
    return f'cannot be opened ({e.strerror or e})'
  for is_kind, kind in _NOT_FILES:
    if is_kind(mode):
      return f'is {kind}, not an image file'
  return None


def list_split(task_dir: Path, split: str, num_classes: int,
               classes_from: str = 'this task') -> list[Listed]:
  """Every line of `<task_dir>/<split>.txt`, checked (module docstring).

  `classes_from` says where `num_classes` came from, for the range error.
  """
  split_file = task_dir / f'{split}.txt'
  if not split_file.is_file():
    present = sorted(p.stem for p in task_dir.glob('*.txt')
                     if p.name != CLASSES_FILE)
    raise DataError(
        f'Split file {split_file} does not exist: create it, or choose among '
        f'the splits of {task_dir} ({", ".join(present) or "none yet"}) with '
        'config.data.train_split / eval_split.')
  listed, unreadable, denied = [], [], []
  for where, relative, label in _split_lines(split_file):
    if not 0 <= label < num_classes:
      raise DataError(f'{where}: label {label} is outside [0, {num_classes})'
                      f' for {classes_from}.')
    if _leaves_folder(relative):
      raise DataError(
          f'{where}: image path {relative!r} leaves the task folder '
          f'{task_dir}; split files list paths relative to it (like '
          f'images/{split}/000000.jpg): fix the line.')
    path = task_dir / relative
    problem = file_problem(path) or image_problem(path)
    if problem in PERMISSION_PROBLEMS:
      denied.append(f'{where}: image {path} {problem}')
    elif problem:
      unreadable.append(f'{where}: image {path} {problem}')
    listed.append(Listed(str(path), label, where))
  if denied:  # One cause (a copy without read permission): one fix for all.
    many = (f'{len(denied)} images listed in {split_file} cannot be read, e.g. '
            if len(denied) > 1 else '')
    raise DataError(
        f'{many}{"; ".join(denied[:3])} (for this user, uid {os.geteuid()}): '
        f'make the images readable (e.g. chmod -R a+rX {task_dir}) or run as '
        'their owner.')
  if len(unreadable) == 1:
    raise DataError(f'{unreadable[0]}: replace the file or remove the line.')
  if unreadable:  # All of them at once, so that one pass fixes the folder.
    raise DataError(
        f'{len(unreadable)} images listed in {split_file} cannot be read, '
        f'e.g. {"; ".join(unreadable[:3])}: replace the files or remove '
        'their lines.')
  if not listed:
    raise DataError(f'Split file {split_file} lists no images.')
  return listed


def _leaves_folder(relative: str) -> bool:
  """Absolute, or climbs out with '..' (judged on the text, links aside)."""
  if os.path.isabs(relative):
    return True
  return os.path.normpath(relative).split(os.sep)[0] == os.pardir


# What TensorFlow decodes (PIL's format names), and for formats whose files
# end with a fixed marker, that marker: its absence means the file was cut.
_DECODABLE = ('JPEG', 'PNG', 'GIF', 'BMP', 'WEBP')
_END_MARKERS = {'JPEG': b'\xff\xd9', 'PNG': b'IEND'}
# JPEG EOI may be followed by a little padding or metadata; look this far back.
_TAIL_BYTES = 4096


def image_problem(path: Path) -> str | None:
  """Why the pipeline could not decode `path`, or None if it looks fine.

  Cheap checks first (size, header, end marker); if they raise a doubt, the
  pipeline's own decoder decides, so only files it rejects are reported.
  """
  try:
    with open(path, 'rb') as f:
      size = os.fstat(f.fileno()).st_size
      if size == 0:
        return 'is empty (0 bytes)'
      f.seek(max(0, size - _TAIL_BYTES))
      tail = f.read()
      f.seek(0)
      with Image.open(f) as image:  # Reads the header only.
        image_format = image.format
  except Image.DecompressionBombError:
    return None  # Huge but well-formed; its pixels are not our concern here.
  except PermissionError:
    return _DENIED
  except UnidentifiedImageError:
    doubt = 'is not an image file (its first bytes match no image format)'
  except (OSError, SyntaxError, ValueError) as e:
    doubt = f'has a damaged header ({e})'
  else:
    marker = _END_MARKERS.get(image_format)
    if image_format not in _DECODABLE:
      doubt = f'is a {image_format} image, which TensorFlow does not decode'
    elif marker is not None and marker not in tail:
      doubt = f'is cut short (no {image_format} end marker)'
    else:
      return None
  try:
    load_image(tf.constant(str(path)))
  except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
    return doubt
  return None


def locate_unreadable(listed: list[Listed],
                      fix: str = 'replace the file or remove the line'
                      ) -> str | None:
  """The first listed image the pipeline cannot decode, as a sentence.

  Called after the pipeline failed: its error says what went wrong, not in
  which file, so we decode each image again, one by one, until one fails.
  `fix` is what the sentence tells the user to do (sources without split
  files have no line to remove).
  """
  for item in listed:
    try:
      load_image(tf.constant(item.path))
    except tf.errors.PermissionDeniedError:
      return f'{item.where}: ' + unreadable_message(item.path, 'image')
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
            tf.errors.UnimplementedError, tf.errors.FailedPreconditionError
            ) as e:
      reason = ' '.join(e.message.split())[:200]
      return (f'{item.where}: image {item.path} cannot be decoded ({reason}): '
              f'{fix}.')
  return None


def load_image(path: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, 3); channels=3 turns grey into RGB.

  JPEGs use the accurate integer IDCT, which reproduces PIL's decoding (that
  of the authors' torchvision loader) exactly; TF's default fast IDCT is off
  by up to 4 levels. Other formats (PNG, ...) go through decode_image.
  """
  data = tf.io.read_file(path)
  image = tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3,
                                dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def custom_task(root: str | os.PathLike, name: str) -> Task:
  """The task 'folder:<name>': the folder `<root>/<name>`, its classes counted.

  The count comes from classes.txt, else from the labels of every split file
  (module docstring), so it is the same whichever split is read.
  """
  task = Task(name=f'{CUSTOM_PREFIX}{name}', num_classes=0,
              folder_names=(name,))
  root = Path(root).expanduser()
  if not (root / name).is_dir() and not (root.is_dir() and root.name == name):
    raise DataError(
        f'No folder {root / name} for task {task.name!r}: set '
        'config.data.data_dir to the directory that holds it, or create it '
        'with one "<image path> <label>" line per image in <split>.txt.')
  task_dir = find_task_dir(root, task)
  names = _class_list(task_dir)
  if names is not None:
    return dataclasses.replace(task, num_classes=len(names))
  split_files = sorted(p for p in task_dir.glob('*.txt')
                       if p.name != CLASSES_FILE)
  labels = set()
  for split_file in split_files:
    for where, _, label in _split_lines(split_file):
      if label < 0:
        raise DataError(f'{where}: label {label} is negative: labels are '
                        'class indices 0, 1, 2, ...')
      labels.add(label)
  if not labels:
    raise DataError(
        f'{task_dir} has no split file that lists an image: write '
        '<split>.txt files with one "<image path> <label>" line per image.')
  num_classes = max(labels) + 1
  unused = sorted(set(range(num_classes)) - labels)
  if unused:
    raise DataError(
        f'No image listed in {task_dir}/*.txt has label {unused[0]}, yet '
        f'labels go up to {num_classes - 1}: labels are class indices '
        f'counted from 0, so renumber them, or list all {num_classes} class '
        f'names (one per line) in {task_dir / CLASSES_FILE} to keep a class '
        'without images.')
  return dataclasses.replace(task, num_classes=num_classes)


def _class_list(task_dir: Path) -> list[str] | None:
  """The names of `<task_dir>/classes.txt` (blank lines skipped), None without it."""
  classes_file = task_dir / CLASSES_FILE
  if not classes_file.is_file():
    return None
  names = [line.strip() for _, line in _text_lines(classes_file, 'Class list')
           if line.strip()]
  if not names:
    raise DataError(
        f'{classes_file} lists no classes: write one class name per line, '
        'or delete it to count the classes from the labels.')
  return names


def class_names(root: str | os.PathLike, task: Task) -> tuple[str, ...] | None:
  """The class names of a folder task when its classes.txt defines them.

  Only a dataset of one's own (`folder:NAME`) takes its classes from
  classes.txt; a VTAB-1k task's folder has none, its classes are the task's.
  """
  if custom_folder_name(task.name) is None:
    return None
  names = _class_list(find_task_dir(root, task))
  return None if names is None else tuple(names)


def make_dataset(root: str | os.PathLike, task: Task, split: str,
                 num_parallel_calls: int
                 ) -> tuple[tf.data.Dataset, int, list[Listed]]:
  """Examples {'image': uint8 (H, W, 3), 'label': int32} in file order.

  Also returns the checked split-file entries, for `locate_unreadable`.
  """
  task_dir = find_task_dir(root, task)
  classes_from = 'this task'
  if custom_folder_name(task.name) is not None:
    classes_file = task_dir / CLASSES_FILE
    if classes_file.is_file():  # Else the count covers every label.
      classes_from = f'the {task.num_classes} classes of {classes_file}'
  listed = list_split(task_dir, split, task.num_classes, classes_from)
  paths = [item.path for item in listed]
  labels = np.asarray([item.label for item in listed], np.int32)
  ds = tf.data.Dataset.from_tensor_slices((paths, labels))
  ds = ds.map(lambda p, y: {'image': load_image(p), 'label': y},
              num_parallel_calls=num_parallel_calls)
  return ds, len(paths), listed
