"""Class-per-folder image trees, as torchvision's ImageFolder and Keras's
`image_dataset_from_directory` read them (`data.source='imagefolder'`).

Two layouts; `<root>` is `data.data_dir`, or `<data_dir>/NAME` for the task
`imagefolder:NAME`:

  split folders  <root>/<split>/<class>/<image>   data.holdout_fraction = 0
      (the default). A split is a folder: data.train_split='train' and
      data.eval_split='test' (or 'val') read train/ and test/.
  class folders  <root>/<class>/<image>           data.holdout_fraction = f > 0
      A seeded part of each class is held out: split 'val' holds
      round(f * n) of a class's n images (at most n - 1, so that every class
      keeps a training image), split 'train' the rest. Which images are held
      out depends on data.split_seed and the file names only, never on the
      run's seed, so every run of a seed sweep is tested on the same images
      (Keras's `validation_split` with a fixed seed does the same, though not
      per class; per class, a small class is not left out of either split).

Classes are numbered as torchvision numbers them: the class names are the
sorted names of the class folders (Python string order), a label is the index
of its class in that list. With split folders the list is the union of the
class folders of every split folder, so train and test agree on the indices
even when a split lacks a class (two separate torchvision ImageFolders would
number them differently without a word).

An image is any file under a class folder, at any depth, whose extension is
one TensorFlow decodes (.jpg .jpeg .png .gif .bmp .webp, any case), taken in
torchvision's order (class, folder path, file name); symbolic links are
followed (a folder reached twice through links is read once). Names that start
with '.' are skipped (.DS_Store, macOS's '._x.jpg', Jupyter's
.ipynb_checkpoints, which torchvision would take for a class); other files
(notes.txt, labels.csv) are ignored, as torchvision and Keras ignore them.

The split is checked before training starts, each problem one sentence that
says what to do:
  * no class folders, or a class folder without images: add the images or
    remove the folder (the union of classes keeps indices aligned, so an empty
    folder is never needed);
  * an image outside any class folder (directly in a split folder or in the
    root): move it into its class folder;
  * a class with a folder in another split but none in the split read for
    training (`train=True`): the model could not learn it, so it is refused;
    an evaluation split may lack classes;
  * images TensorFlow does not decode (.tif, .tiff, .ppm, .pgm, which
    torchvision would read): convert them;
  * file or folder names that are not UTF-8: rename them;
  * a folder one may not enter, and the image checks of the split-file folder
    (`folder.file_problem`, `folder.image_problem`): unreadable files (a
    permission problem, fixed with chmod), files that are not images, damaged
    or cut-short JPEG/PNG; all of a split's bad images in one message.
There are no text files, so the split-file folder's text checks (byte-order
marks, non-UTF-8 lines) have nothing to check here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
import zlib

import numpy as np
from pyra_jax.data.tf_import import tf

from pyra_jax.data import folder
from pyra_jax.data.errors import DataError
from pyra_jax.data.tasks import IMAGEFOLDER_PREFIX, imagefolder_name

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
# Image formats torchvision's ImageFolder reads that TensorFlow does not decode.
UNDECODABLE_EXTENSIONS = ('.tif', '.tiff', '.ppm', '.pgm')
# The two splits of a tree of class folders (data.holdout_fraction > 0).
HOLDOUT_SPLITS = ('train', 'val')
# Folder names that mean "a split", to recognise a tree in the other layout.
_SPLIT_NAMES = ('train', 'training', 'val', 'valid', 'validation', 'test')
_EXTENSIONS = ' '.join(IMAGE_EXTENSIONS)


@dataclasses.dataclass(frozen=True)
class Tree:
  """A scanned image tree.

  Attributes:
    root: its root folder.
    splits: names of its split folders; None for class folders at the root
      (the splits are then `HOLDOUT_SPLITS`).
    class_names: sorted class folder names; a label indexes this tuple.
  """
  root: Path
  splits: tuple[str, ...] | None
  class_names: tuple[str, ...]

  @property
  def task(self) -> str:
    return f'{IMAGEFOLDER_PREFIX}{self.root.name}'


def _shown(path: str | os.PathLike) -> str:
  """A path fit to print, with bytes that are not UTF-8 replaced."""
  return os.fsencode(path).decode('utf-8', 'replace')


def _check_name(path: Path) -> None:
  try:
    str(path).encode('utf-8')
  except UnicodeEncodeError:
    raise DataError(
        f'The name of {_shown(path)} is not UTF-8 text: rename it (e.g. '
        'convmv -f latin1 -t utf-8 --notest on its folder).') from None


def _folder_denied(directory: str | os.PathLike) -> DataError:
  return DataError(
      f'Folder {_shown(directory)} cannot be listed by this user (uid '
      f'{os.geteuid()}): permission denied; make it readable (e.g. chmod -R '
      f'a+rX {_shown(directory)}) or run as its owner.')


def _entries(directory: Path) -> tuple[list[str], list[str]]:
  """(sorted sub-folder names, sorted image file names) directly in `directory`.

  Hidden names are skipped; a link to a folder counts as a folder.
  """
  try:
    entries = list(os.scandir(directory))
  except PermissionError:
    raise _folder_denied(directory) from None
  except OSError as e:
    raise DataError(f'Folder {_shown(directory)} cannot be read '
                    f'({e.strerror or e}).') from None
  folders, images = [], []
  for entry in entries:
    if entry.name.startswith('.'):
      continue
    try:
      is_dir = entry.is_dir()
    except OSError:
      is_dir = False
    if is_dir:
      _check_name(Path(entry.path))
      folders.append(entry.name)
    elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
      _check_name(Path(entry.path))
      images.append(entry.name)
  return sorted(folders), sorted(images)


def _refuse_loose_images(directory: Path, images: list[str]) -> None:
  if images:
    more = (f' (and {len(images) - 1} more in that folder)'
            if len(images) > 1 else '')
    raise DataError(
        f'Image {_shown(directory / images[0])} lies outside any class folder'
        f'{more}: move it into the folder of its class '
        f'({_shown(directory)}/<class>/).')


def find_root(data_dir: str, task: str) -> Path:
  """The tree's root: `data_dir`, or `data_dir/NAME` for 'imagefolder:NAME'."""
  if not data_dir:
    raise DataError(
        "config.data.data_dir is not set: with data.source='imagefolder' it "
        'is the root of the image tree (<root>/<split>/<class>/<image>), e.g. '
        'data_dir=/data/pets.')
  root = Path(data_dir).expanduser()
  name = imagefolder_name(task)
  if name is not None:
    if (root / name).is_dir():
      root = root / name
    elif not (root.is_dir() and root.name == name):
      raise DataError(
          f'No folder {_shown(root / name)} for task {task!r}: set '
          'config.data.data_dir to the directory that holds it.')
  if not root.is_dir():
    raise DataError(
        f'Image tree {_shown(root)} is not a directory: set config.data.data_dir '
        'to the folder that holds <split>/<class>/<image> (or <class>/<image> '
        'with data.holdout_fraction).')
  return root


def scan(root: Path, holdout_fraction: float) -> Tree:
  """The layout and the class names of the tree at `root` (module docstring)."""
  if not 0.0 <= holdout_fraction < 1.0:
    raise DataError(
        f'data.holdout_fraction = {holdout_fraction} is outside [0, 1): use 0 '
        'for split folders, or e.g. 0.2 to hold out a fifth of each class.')
  folders, images = _entries(root)
  if holdout_fraction:
    for name in folders:
      if name.lower() in _SPLIT_NAMES:
        sub_folders, sub_images = _entries(root / name)
        if sub_folders and not sub_images:
          raise DataError(
              f'{_shown(root)} holds split folders ({", ".join(folders)}), not '
              'class folders: set data.holdout_fraction=0 and name the splits '
              'with data.train_split / data.eval_split (e.g. train, test).')
    _refuse_loose_images(root, images)
    if not folders:
      raise DataError(_no_classes(root, '<root>/<class>/<image>'))
    return Tree(root, None, tuple(folders))

  if not folders:
    if images:
      raise DataError(
          f'{_shown(root)} holds images but no class folders: put each '
          "class's images in <root>/<split>/<class>/ (e.g. train/cat/1.jpg).")
    raise DataError(_no_classes(root, '<root>/<split>/<class>/<image>'))
  classes = set()
  for split in folders:
    split_classes, loose = _entries(root / split)
    if loose and not split_classes:
      raise DataError(
          f'{_shown(root / split)} holds images but no class folders, so '
          f'{_shown(root)} looks like class folders without split folders '
          '(<root>/<class>/<image>): set data.holdout_fraction (e.g. 0.2) to '
          "hold out part of each class as split 'val' (train on 'train'), or "
          'arrange it as <root>/<split>/<class>/<image>.')
    _refuse_loose_images(root / split, loose)
    classes.update(split_classes)
  if not classes:
    raise DataError(_no_classes(root, '<root>/<split>/<class>/<image>'))
  return Tree(root, tuple(folders), tuple(sorted(classes)))


def _no_classes(root: Path, layout: str) -> str:
  return (f'No class folders in {_shown(root)}: put the images in one folder '
          f'per class, {layout} (e.g. cat/1.jpg, dog/2.jpg).')


def _class_images(class_dir: Path, undecodable: list[Path]) -> list[Path]:
  """Images under `class_dir` at any depth, in torchvision's order.

  Files of formats TensorFlow does not decode are added to `undecodable`.
  """
  def refuse(error: OSError):
    if isinstance(error, PermissionError):
      raise _folder_denied(error.filename or class_dir)
    raise DataError(f'Folder {_shown(error.filename or class_dir)} cannot be '
                    f'read ({error.strerror or error}).')

  found, seen = [], set()
  for dirpath, dirnames, filenames in os.walk(class_dir, onerror=refuse,
                                              followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # A link loop, or a folder linked twice: read once.
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    found.append((dirpath, [f for f in filenames if not f.startswith('.')]))
  images = []
  for dirpath, filenames in sorted(found):
    for name in sorted(filenames):
      path = Path(dirpath) / name
      extension = os.path.splitext(name)[1].lower()
      if extension in IMAGE_EXTENSIONS:
        _check_name(path)
        images.append(path)
      elif extension in UNDECODABLE_EXTENSIONS:
        undecodable.append(path)
  return images


def held_out(num_images: int, fraction: float, seed: int,
             class_name: str) -> np.ndarray:
  """Which of a class's images (in tree order) form the held-out split 'val'.

  round(fraction * n) of them, at most n - 1, chosen by a generator seeded
  with the seed and the class name, so a class's split does not change when
  other classes are added.
  """
  count = min(num_images - 1, int(math.floor(fraction * num_images + 0.5)))
  rng = np.random.default_rng([seed, zlib.crc32(class_name.encode('utf-8'))])
  mask = np.zeros(num_images, bool)
  mask[rng.permutation(num_images)[:max(count, 0)]] = True
  return mask


def list_split(tree: Tree, split: str, *, train: bool,
               holdout_fraction: float = 0.0,
               split_seed: int = 0) -> list[folder.Listed]:
  """Every image of a split with its label, checked (module docstring)."""
  root = tree.root
  undecodable: list[Path] = []
  per_class: list[tuple[int, list[Path]]] = []
  if tree.splits is None:
    if split not in HOLDOUT_SPLITS:
      raise DataError(
          f'Split {split!r} of the image tree {_shown(root)}: with '
          'data.holdout_fraction set its splits are '
          f"{' and '.join(repr(s) for s in HOLDOUT_SPLITS)} (the held-out part): set "
          "config.data.train_split='train' and config.data.eval_split='val'.")
    if split_seed < 0:
      raise DataError(f'data.split_seed = {split_seed}: use a seed >= 0.')
    where = root
    empty = []
    for label, name in enumerate(tree.class_names):
      images = _class_images(root / name, undecodable)
      if not images:
        empty.append(name)  # Refused below, with the others.
        continue
      mask = held_out(len(images), holdout_fraction, split_seed, name)
      keep = mask if split == 'val' else ~mask
      per_class.append((label, [p for p, k in zip(images, keep) if k]))
  else:
    if split not in tree.splits:
      raise DataError(
          f'Split folder {_shown(root / split)} does not exist: choose among '
          f'the split folders of {_shown(root)} ({", ".join(tree.splits)}) with '
          'config.data.train_split / eval_split.')
    where = root / split
    present, _ = _entries(where)
    if train:
      for name in tree.class_names:
        if name not in present:
          other = next(s for s in tree.splits if (root / s / name).is_dir())
          raise DataError(
              f'Class {name!r} has a folder in {_shown(root / other)} but none '
              f'in the training split {_shown(where)}: the model could not '
              f'learn it; add its training images in {_shown(where / name)}, or '
              f'remove {_shown(root / other / name)}.')
    empty = []
    for name in present:
      images = _class_images(where / name, undecodable)
      if images:
        per_class.append((tree.class_names.index(name), images))
      else:
        empty.append(name)
  if empty:
    directory = where / empty[0]
    more = f' (and {len(empty) - 1} more class folders)' if len(empty) > 1 else ''
    raise DataError(
        f'Class folder {_shown(directory)} holds no image ({_EXTENSIONS})'
        f'{more}: add its images or remove the folder.')
  if undecodable:
    formats = ' '.join(UNDECODABLE_EXTENSIONS)
    if len(undecodable) == 1:
      raise DataError(
          f'Image {_shown(undecodable[0])} is in a format TensorFlow does not '
          f'decode ({formats}): convert it to PNG (e.g. mogrify -format png) '
          'or remove it.')
    raise DataError(
        f'{len(undecodable)} images under {_shown(where)} are in a format '
        f'TensorFlow does not decode ({formats}), e.g. '
        f'{_shown(undecodable[0])}: convert them to PNG (e.g. mogrify -format '
        'png) or remove them.')
  listed = [folder.Listed(str(path), label, f'Class {tree.class_names[label]!r}')
            for label, paths in per_class for path in paths]
  if not listed and tree.splits is None:
    raise DataError(
        f"The held-out split 'val' of {_shown(root)} is empty: "
        f'data.holdout_fraction = {holdout_fraction} holds out round(f * n) '
        'of the n images of each class; raise it.')
  return _checked(where, listed)


def _checked(where: Path, listed: list[folder.Listed]) -> list[folder.Listed]:
  """`listed`, after the split-file folder's image checks (folder.py)."""
  denied, unreadable = [], []
  for item in listed:
    path = Path(item.path)
    problem = folder.file_problem(path) or folder.image_problem(path)
    if problem in folder.PERMISSION_PROBLEMS:
      denied.append(f'{_shown(path)} {problem}')
    elif problem:
      unreadable.append(f'{_shown(path)} {problem}')
  if denied:  # One cause (a copy without read permission): one fix for all.
    what = (f'{len(denied)} images under {_shown(where)} cannot be read, e.g. '
            if len(denied) > 1 else 'Image ')
    raise DataError(
        f'{what}{"; ".join(denied[:3])} (for this user, uid {os.geteuid()}): '
        f'make the images readable (e.g. chmod -R a+rX {_shown(where)}) or run '
        'as their owner.')
  if len(unreadable) == 1:
    raise DataError(f'Image {unreadable[0]}: replace the file or remove it.')
  if unreadable:  # All of them at once, so that one pass fixes the tree.
    raise DataError(
        f'{len(unreadable)} images under {_shown(where)} cannot be read, e.g. '
        f'{"; ".join(unreadable[:3])}: replace the files or remove them.')
  if not listed:
    raise DataError(_no_classes(where, '<split>/<class>/<image>'))
  return listed


def make_dataset(listed: list[folder.Listed], num_parallel_calls: int
                 ) -> tf.data.Dataset:
  """Examples {'image': uint8 (H, W, 3), 'label': int32} in tree order."""
  paths = [item.path for item in listed]
  labels = np.asarray([item.label for item in listed], np.int32)
  ds = tf.data.Dataset.from_tensor_slices((paths, labels))
  return ds.map(lambda p, y: {'image': folder.load_image(p), 'label': y},
                num_parallel_calls=num_parallel_calls)
