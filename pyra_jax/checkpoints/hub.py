"""Pretrained weights by Hugging Face Hub name: `hf-hub:<owner>/<repo>`.

The paper's backbones are mirrored on the Hub under timm's names (docs/usage.md,
"Pretrained weights"), which many users can reach when the original cloud
bucket is closed to them. A spec

  hf-hub:<owner>/<repo>[/<file in the repo>][@<revision>]

e.g. `hf-hub:timm/vit_base_patch16_224.orig_in21k`, is turned into a local
file by `huggingface_hub.hf_hub_download`: the first call downloads it into the
Hub cache (HF_HUB_CACHE, by default ~/.cache/huggingface/hub); later calls,
also offline (HF_HUB_OFFLINE=1), return the cached copy. The file is then
read exactly like a local path: the same file checks and the same format
detection (timm's repositories hold `model.safetensors`, the default file, in
timm names, which 'auto' detects as 'timm').

huggingface_hub is imported here only, when a spec is resolved: local files
need no extra package, and a missing package is a one-sentence error.

A spec is checked by `parse` before anything is downloaded (and, in training,
before the data is prepared): owner and repository names as the Hub allows
them, and a file path inside the repository that cannot climb out of it
(no '.' or '..' parts, not absolute), so a mistyped or hostile name is one
sentence saying which part is wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re

from pyra_jax.checkpoints import common

PREFIX = 'hf-hub:'
# What timm's Hub repositories hold (also pytorch_model.bin, which needs torch).
DEFAULT_FILE = 'model.safetensors'
_EXAMPLE = 'hf-hub:timm/vit_base_patch16_224.orig_in21k'


@dataclasses.dataclass(frozen=True)
class HubSpec:
  """A parsed `hf-hub:` spec."""
  repo_id: str
  filename: str = DEFAULT_FILE
  revision: str | None = None  # None: the repository's default branch.

  @property
  def url(self) -> str:
    """Where a browser downloads the file (the no-huggingface_hub route)."""
    return (f'https://huggingface.co/{self.repo_id}/resolve/'
            f'{self.revision or "main"}/{self.filename}')


def is_hub_spec(spec: str) -> bool:
  return isinstance(spec, str) and spec.startswith(PREFIX)


# An owner or repository name as the Hub allows it: letters, digits, '-',
# '_', '.', at most 96, not starting or ending with '-' or '.', no '--' or '..'.
_HUB_NAME = re.compile(r'[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?')


def _name_problem(parts: list[str], revision: str | None) -> str:
  """What is wrong with the parts of a spec, as a clause; '' if nothing."""
  if len(parts) < 2 or not all(p.strip() for p in parts):
    return 'it needs <owner>/<repo> and no empty part'
  for what, name in (('owner', parts[0]), ('repository', parts[1])):
    if (not _HUB_NAME.fullmatch(name) or '--' in name or '..' in name
        or name.endswith('.git')):
      return (f'the {what} {name!r} may hold only letters, digits, -, _ and '
              '. (no -- or .., and - or . neither first nor last)')
  if any(p in ('.', '..') or '\\' in p for p in parts[2:]):
    return (f'the file {"/".join(parts[2:])!r} may not have . or .. parts or '
            'backslashes, which would leave the repository')
  if revision is not None and (not revision or any(c.isspace() for c in revision)
                               or '..' in revision.split('/')):
    return f'the revision {revision!r} is not a branch, tag or commit hash'
  return ''


def parse(spec: str) -> HubSpec:
  """'hf-hub:owner/repo[/file][@revision]' -> HubSpec; a bad spec says the form.

  Hub repository names are always `owner/repo`, so anything after the second
  '/' is the file inside the repository; '@' cannot occur in a repository name
  and starts the revision (a branch, tag or commit hash).
  """
  body, at, revision = spec[len(PREFIX):].partition('@')
  parts = body.split('/')
  problem = _name_problem(parts, revision if at else None)
  if problem:
    raise common.CheckpointError(
        f'{spec!r} is not a Hub name: write hf-hub:<owner>/<repo>[/<file in '
        f'the repo>][@<revision>] ({problem}), e.g. {_EXAMPLE} (docs/usage.md, '
        '"Pretrained weights", lists the paper\'s).')
  return HubSpec(repo_id='/'.join(parts[:2]),
                 filename='/'.join(parts[2:]) or DEFAULT_FILE,
                 revision=revision or None)


def resolve(spec: str) -> str:
  """The local path of the file `spec` names, downloaded once into the Hub cache.

  Raises:
    CheckpointError: one sentence saying what went wrong (not installed,
      offline without the file in the cache, no such repository, revision or
      file, a network failure) and what to do.
  """
  hub = parse(spec)
  manual = (f'or download {hub.url} and set model_init (or `--src`) to the '
            "file's path")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise common.CheckpointError(
        f'{spec} needs the huggingface_hub package, which is not installed: '
        '`pip install huggingface-hub` (its version is pinned in '
        f'requirements.txt), {manual}.') from None
  try:
    return huggingface_hub.hf_hub_download(
        hub.repo_id, hub.filename, revision=hub.revision)
  except errors.LocalEntryNotFoundError:
    cache = constants.HF_HUB_CACHE
    offline = constants.is_offline_mode()
    why = ('HF_HUB_OFFLINE is set' if offline else
           'the Hub could not be reached')
    raise common.CheckpointError(
        f'{spec}: {hub.filename} of {hub.repo_id} is not in the Hugging Face '
        f'cache {cache} and cannot be downloaded ({why}){_in_cache(hub, cache)}'
        f': run once with network access to fill the cache, point '
        f'HF_HUB_CACHE at a cache that holds it, {manual}.') from None
  except errors.GatedRepoError:
    raise common.CheckpointError(
        f'{spec}: the repository {hub.repo_id} is gated: accept its terms on '
        f'https://huggingface.co/{hub.repo_id} and log in (`hf auth login`), '
        f'{manual}.') from None
  except errors.RepositoryNotFoundError:
    raise common.CheckpointError(
        f'{spec}: the Hub has no repository {hub.repo_id} (or it is private): '
        'check the name against the table in docs/usage.md, "Pretrained '
        'weights".') from None
  except errors.RevisionNotFoundError:
    raise common.CheckpointError(
        f'{spec}: {hub.repo_id} has no revision {hub.revision!r}: use a '
        'branch, tag or commit hash of the repository, or drop the @.'
    ) from None
  except errors.RemoteEntryNotFoundError:
    raise common.CheckpointError(
        f'{spec}: {hub.repo_id} has no file {hub.filename}: name one of its '
        f'files after the repository, e.g. hf-hub:{hub.repo_id}/'
        'pytorch_model.bin (listed on https://huggingface.co/'
        f'{hub.repo_id}/tree/main).') from None
  except (errors.HFValidationError, ValueError) as e:
    raise common.CheckpointError(
        f'{spec} is not a valid Hub name ({_one_line(e)}): write it as on the '
        f'Hub, e.g. {_EXAMPLE}.') from None
  except (errors.HfHubHTTPError, OSError) as e:
    raise common.CheckpointError(
        f'{spec} could not be downloaded ({_one_line(e)}): check the network '
        f'(or set HF_HUB_OFFLINE=1 to use the cache only), {manual}.') from None


def _in_cache(hub: HubSpec, cache: str) -> str:
  """What the cache holds that the user may have meant, as a clause ('' if none)."""
  try:
    cached = sorted(name[len('models--'):].replace('--', '/', 1)
                    for name in os.listdir(cache) if name.startswith('models--'))
  except OSError:
    return ''
  if hub.repo_id in cached:
    return f' (the cache holds other files or revisions of {hub.repo_id})'
  close = difflib.get_close_matches(hub.repo_id, cached, n=1, cutoff=0.8)
  return (f' (the cache holds {close[0]}: did you mean {PREFIX}{close[0]}?)'
          if close else '')


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split())[:200] or type(e).__name__
