"""The user docs (README.md and docs/*.md) stay true and self-contained.

What a reader copies from them must work: every `python -m pyra_jax.<module>`
command names a module that exists and only flags that module defines (read
from its own `--helpfull` / `--help`, once per module), every `--config.<field>`
is a field of the base config, every setting file and `key=` of the config
argument exists, every relative link and anchor leads somewhere, every test a
guarantee cites exists. And nothing points outside the repository: no path of a
development machine, no `../shared`, no issue numbers. docs/configs.md is the
generator's output, not a hand-edited copy.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from pyra_jax import config_docs
from pyra_jax.configs import common
from pyra_jax.configs import paper
from tests.helpers.cli import ROOT

README = ROOT / 'README.md'
README_MAX_LINES = 300
# The quick start's three commands, verbatim (CI runs the last one).
QUICK_START = (
    './setup.sh',
    '.venv/bin/python -m pyra_jax.main --config=configs/demo.py --workdir=workdirs/demo',
    '.venv/bin/python -m pytest tests -q -n 2',
)

# (pattern, what it is): none may appear on any line of the user docs.
FORBIDDEN = (
    (re.compile(r'/work/|/root/'), 'a path of a development machine'),
    (re.compile(r'\.\./shared|\bshared/data\b'), 'a folder outside the repository'),
    (re.compile(r'\bissues?\s*#?\d+', re.I), 'an issue number'),
    (re.compile(r'(?<![\w&#/])#\d+(?![\w-])'), 'an issue reference'),
)

FENCE = re.compile(r'^(```|~~~).*?^\1[ \t]*$', re.M | re.S)
LINK = re.compile(r'!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+"[^"]*")?\s*\)')
SEPARATORS = {'&&', '||', ';', '|', '&'}


def doc_files() -> list[Path]:
  return [README, *sorted((ROOT / 'docs').glob('*.md'))]


def rel(path: Path) -> str:
  return str(path.relative_to(ROOT))


# --------------------------------------------------------------------------- #
# Reading the docs: code blocks, inline code, headings, links.
# --------------------------------------------------------------------------- #

def code_blocks(text: str) -> list[str]:
  """The contents of the fenced code blocks."""
  return [m.group(0).split('\n', 1)[1].rsplit('\n', 1)[0] for m in FENCE.finditer(text)]


def prose(text: str) -> str:
  """The text outside fenced code blocks."""
  return FENCE.sub('', text)


def inline_code(text: str) -> list[str]:
  """Inline code spans of the prose, a span broken over lines joined by a space."""
  return [' '.join(m.group(1).split()) for m in re.finditer(r'`([^`]+)`', prose(text))]


def shell_lines(block: str) -> list[str]:
  """A code block's lines with backslash continuations joined."""
  return block.replace('\\\n', ' ').splitlines()


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
  seen: dict[str, int] = {}
  out = set()
  for m in re.finditer(r'^#{1,6}\s+(.*?)\s*#*\s*$', prose(path.read_text()), re.M):
    base = slug(m.group(1))
    n = seen.get(base, 0)
    seen[base] = n + 1
    out.add(base if n == 0 else f'{base}-{n}')
  return frozenset(out)


# --------------------------------------------------------------------------- #
# Commands.
# --------------------------------------------------------------------------- #

@functools.lru_cache(maxsize=None)
def console_scripts() -> dict[str, str]:
  """pyproject's `[project.scripts]`: 'pyra-jax' -> 'pyra_jax.main'."""
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  return {name: target.split(':')[0] for name, target in scripts.items()}


def module_exists(module: str) -> bool:
  """`python -m module` would find it in this repository (a module or a package's
  __main__), judged from the files, so nothing is imported."""
  path = ROOT.joinpath(*module.split('.'))
  return path.with_suffix('.py').is_file() or (path / '__main__.py').is_file()


def commands(text: str) -> list[tuple[str, list[str]]]:
  """Every pyra_jax command in `text`'s code: (module, its arguments).

  Read from the shell lines of code blocks and from inline code spans;
  `python`, `python3` or any `.../bin/python` with `-m pyra_jax...`, and the
  console scripts of pyproject.toml.
  """
  sources = [line for block in code_blocks(text) for line in shell_lines(block)]
  sources += inline_code(text)
  found = []
  for source in sources:
    if 'pyra_jax' not in source and 'pyra-jax' not in source:
      continue
    try:
      lexer = shlex.shlex(source, posix=True, punctuation_chars=';&|')
      lexer.whitespace_split = True
      tokens = list(lexer)
    except ValueError:  # Not shell (unbalanced quotes in prose-like code).
      continue
    for i, tok in enumerate(tokens):
      module, start = None, None
      if re.fullmatch(r'(?:\S*/)?python3?', tok) and tokens[i + 1:i + 2] == ['-m']:
        if i + 2 < len(tokens) and re.fullmatch(r'pyra_jax(\.\w+)+', tokens[i + 2]):
          module, start = tokens[i + 2], i + 3
      elif tok in console_scripts() and (i == 0 or tokens[i - 1] in SEPARATORS):
        module, start = console_scripts()[tok], i + 1
      if module is None:
        continue
      args = []
      for arg in tokens[start:]:
        if arg in SEPARATORS:
          break
        args.append(arg)
      found.append((module, args))
  return found


@functools.lru_cache(maxsize=None)
def help_text(module: str, subcommand: str | None) -> str:
  """What `python -m module [subcommand] --helpfull` (absl) or `--help`
  (argparse) prints: the list of the flags it defines."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  text = ''
  for flag in ('--helpfull', '--help'):
    proc = subprocess.run(
        [sys.executable, '-m', module, *([subcommand] if subcommand else []), flag],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    if proc.returncode == 2 and ': error: ' in text:  # argparse does not know --helpfull.
      continue
    if re.search(r'^\s*(?:-\w+,\s*)?--\[?\w', text, re.M):
      return text
  return text


def defines_flag(help_output: str, name: str) -> bool:
  """`--name` (or `--noname` for a boolean) in a help's list of flags, where each
  flag starts a line: absl's `--name:` / `--[no]name:`, argparse's `--name NAME`."""
  names = [name] + ([name[2:]] if name.startswith('no') else [])
  return any(re.search(r'^\s*(?:-\w+,\s*)?--(?:\[no\])?' + re.escape(n) + r'(?::|\s|,|$)',
                       help_output, re.M) for n in names)


@functools.lru_cache(maxsize=None)
def config_fields() -> frozenset[str]:
  """Every field of the base config, and every sub-config ('model', 'data', ...)."""
  fields = set(config_docs.flatten(common.get_base_config().to_dict()))
  return frozenset(fields | {f.rsplit('.', 1)[0] for f in fields if '.' in f})


def check_setting(value: str) -> str | None:
  """The problem with a `--config=` value, if any: a setting file that does not
  exist, or a key of its argument that the settings do not take."""
  if not re.fullmatch(r'[\w./-]+(:[\w.,=:/+-]*)?', value):
    return None  # A placeholder: '...', '<setting>', '$F,method=tome'.
  path, _, arg = value.partition(':')
  if not re.search(r'[a-z]', path):
    return None
  if '/' in path:
    exists = (ROOT / path).is_file()
  else:  # A packaged setting by name (installed commands).
    exists = path.removesuffix('.py') in (p.stem for p in (ROOT / 'pyra_jax/configs').glob('*.py'))
  if not exists:
    return f'no setting file {path}'
  if arg and (path.startswith('configs/') or '/' not in path):
    bad = [kv.partition('=')[0] for kv in arg.split(',')
           if kv.partition('=')[0] not in paper.ARG_KEYS]
    if bad:
      return f'{path}: the config argument takes no key {", ".join(bad)}'
  return None


def subcommand_of(args: list[str]) -> str | None:
  """`plots tsne ...`: a first argument that is a word names a subcommand."""
  return args[0] if args and re.fullmatch(r'[a-z][a-z_]*', args[0]) else None


def help_keys(paths: list[Path]) -> set[tuple[str, str | None]]:
  """The (module, subcommand) pairs whose flags the pages use."""
  return {(module, subcommand_of(args)) for path in paths
          for module, args in commands(path.read_text())
          if module_exists(module)
          and any(a.startswith('--') and not a.startswith('--config.') for a in args)}


def command_problems(path: Path) -> list[str]:
  problems = []
  text = path.read_text()
  for module, args in commands(text):
    where = f'{rel(path)}: python -m {module} {" ".join(args)}'
    if not module_exists(module):
      problems.append(f'{where}: no module {module}')
      continue
    subcommand = subcommand_of(args)
    for arg in args:
      if not arg.startswith('--') or arg == '--':
        continue
      name, _, value = arg[2:].partition('=')
      if name.startswith('config.'):
        continue  # Checked with every other --config.<field> of the page below.
      if name == 'config' and value and (problem := check_setting(value)):
        problems.append(f'{where}: {problem}')
      if not defines_flag(help_text(module, subcommand), name):
        problems.append(f'{where}: {module} has no flag --{name}')
  for m in re.finditer(r'--config\.([\w.]+)', text):
    field = m.group(1).rstrip('.')
    if field not in config_fields():
      problems.append(f'{rel(path)}: --config.{field} is no config field')
  return problems


# --------------------------------------------------------------------------- #
# The tests.
# --------------------------------------------------------------------------- #

def test_readme_is_short_and_opens_with_the_three_commands():
  text = README.read_text()
  assert len(text.splitlines()) <= README_MAX_LINES, (
      f'README.md has {len(text.splitlines())} lines; at most {README_MAX_LINES}: '
      'move the details to docs/.')
  first = code_blocks(text)[0]
  got = tuple(line.split('#', 1)[0].strip() for line in shell_lines(first) if line.strip())
  assert got == QUICK_START, first


def test_no_line_names_a_development_path_or_an_issue():
  found = []
  for path in doc_files():
    for n, line in enumerate(path.read_text().splitlines(), start=1):
      for pattern, what in FORBIDDEN:
        if m := pattern.search(line):
          found.append(f'{rel(path)}:{n}: {what} ({m.group(0)!r}): {line.strip()[:120]}')
  assert not found, '\n'.join(found)


def test_relative_links_lead_to_existing_files_and_headings():
  broken = []
  for path in doc_files():
    for m in LINK.finditer(re.sub(r'`[^`]*`', '', prose(path.read_text()))):
      target = m.group(1)
      if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
        continue
      file, _, anchor = target.partition('#')
      dest = (path.parent / file).resolve() if file else path
      if not dest.exists():
        broken.append(f'{rel(path)}: {target}: no such file')
      elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
        broken.append(f'{rel(path)}: {target}: no heading #{anchor} in {rel(dest)}')
  assert not broken, '\n'.join(broken)


def test_commands_name_existing_modules_flags_and_config_fields():
  # One test for every page, so each module's help runs once; two at a time.
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    list(pool.map(lambda key: help_text(*key), help_keys(doc_files())))
  problems = [p for path in doc_files() for p in command_problems(path)]
  assert not problems, '\n'.join(problems)


def test_the_command_reader_sees_what_it_checks():
  # The parsing itself, on a made-up page: if it found nothing, the test above
  # would pass on any docs.
  page = ('```bash\n.venv/bin/python -m pyra_jax.nosuch --x=1\n'
          'python -m pyra_jax.main --config=configs/demo.py:taks=mnist \\\n'
          '    --workdir=w --no_such_flag  # comment\n```\n'
          'Inline: `python -m pyra_jax.main --mode=eval\n--two_stage`, '
          '`pyra-jax --config=vitb_high:task=dtd`, `--config.model.lora_rnk=4`.\n')
  found = commands(page)
  assert found == [
      ('pyra_jax.nosuch', ['--x=1']),
      ('pyra_jax.main', ['--config=configs/demo.py:taks=mnist', '--workdir=w',
                         '--no_such_flag']),
      ('pyra_jax.main', ['--mode=eval', '--two_stage']),
      ('pyra_jax.main', ['--config=vitb_high:task=dtd']),
  ]
  assert not module_exists('pyra_jax.nosuch') and module_exists('pyra_jax.main')
  assert check_setting('configs/demo.py:taks=mnist') == (
      'configs/demo.py: the config argument takes no key taks')
  assert check_setting('configs/nosuch.py') == 'no setting file configs/nosuch.py'
  assert check_setting('vitb_high:task=dtd') is None and check_setting('...') is None
  main_help = help_text('pyra_jax.main', None)
  assert defines_flag(main_help, 'workdir') and defines_flag(main_help, 'notwo_stage')
  assert not defines_flag(main_help, 'no_such_flag')
  assert 'model.lora_rank' in config_fields() and 'model.lora_rnk' not in config_fields()


def test_reliability_guarantees_cite_existing_tests():
  defined = {}
  for test_file in (ROOT / 'tests').rglob('test_*.py'):
    defined.setdefault(test_file.name, set()).update(
        re.findall(r'^\s*def (test_\w+)', test_file.read_text(), re.M))
  missing, cited = [], 0
  for path in doc_files():
    current = None
    for m in re.finditer(r'(?:(?:[\w/]+/)?(test_\w+\.py))?::(test_\w+)', path.read_text()):
      current = m.group(1) or current
      cited += 1
      if m.group(2) not in defined.get(current, ()):
        missing.append(f'{rel(path)}: {current}::{m.group(2)}')
  assert cited >= 40, cited  # docs/reliability.md cites every guarantee's test.
  assert not missing, '\n'.join(missing)


def test_configs_page_is_what_the_generator_writes():
  page = ROOT / 'docs' / 'configs.md'
  assert page.exists() and page.read_text() == config_docs.markdown(), (
      'docs/configs.md is stale: run `python docs/make_configs.py`.')
  for field in config_docs.flatten(common.get_base_config().to_dict()):
    assert f'| `{field}` |' in page.read_text(), field
