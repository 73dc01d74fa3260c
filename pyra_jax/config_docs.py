"""The config fields' documentation, read from the comments of configs/common.py.

`configs/common.py` is the one place where a config field is declared and
documented (the comment above its assignment and its trailing comment). Two
readers need those docs as text: `python -m pyra_jax.main --helpfull`, which
prints every field of a setting, and `docs/configs.md`, the reference page
generated from them (`python docs/make_configs.py`). Reading the comments
instead of keeping a second copy means the help, the page and the code cannot
disagree.

No absl and no flags here: the parser is plain text processing, importable by
the commands, the page generator and the tests alike.
"""

from __future__ import annotations

import dataclasses
import io
import re
import tokenize

from pyra_jax import configs

# A section ruler of common.py: `# --- Model ---------`.
_RULER = re.compile(r'^-{3,}\s*(.*?)\s*-*$')


@dataclasses.dataclass(frozen=True)
class FieldDoc:
  """One documented assignment of common.py.

  name:    the full path, 'config.model.lora_rank' (or 'config.model' for a section)
  doc:     its comment text, '' if it has none
  section: the ruler above it ('Model', 'Data', ...), '' before the first ruler
  """
  name: str
  doc: str
  section: str


def parse_fields(source: str | None = None) -> list[FieldDoc]:
  """Every `config...` assignment of common.py with its doc and section, in order.

  A field's doc is the comment block right above its assignment plus its
  trailing comment (and the comment lines aligned under that trailing one).
  Section rulers ('# --- Model ---') are not docs; they name the section of
  the fields below them. A name assigned twice keeps its last doc.
  """
  if source is None:
    source = (configs.SETTINGS_DIR / 'common.py').read_text()
  aliases = {'config': 'config'}
  docs: dict[str, str] = {}
  sections: dict[str, str] = {}
  section = ''
  pending: list[str] = []          # Comment lines above the next assignment.
  last_field, last_col = None, -1  # For continuation comment lines.
  comments = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = (tok.start[1], tok.string.lstrip('#').strip())
  assign = re.compile(r'^\s*((?:\w+\.)*\w+)\s*=\s*((?:\w+\.)*\w+\s*=)?')
  for lineno, line in enumerate(source.splitlines(), start=1):
    code = line.split('#', 1)[0] if lineno in comments else line
    m = assign.match(code)
    if not code.strip():
      if lineno in comments:
        col, text = comments[lineno]
        if last_field and col == last_col:
          docs[last_field] += ' ' + text
        elif text.startswith('---'):
          ruler = _RULER.match(text)
          section = ruler.group(1) if ruler else section
        else:
          pending.append(text)
          last_field = None
      else:
        pending, last_field = [], None
      continue
    if not m:
      pending, last_field = [], None
      continue
    targets = [m.group(1)] + ([m.group(2).rstrip('=').strip()] if m.group(2) else [])
    # `model = config.model = ...`: the rightmost target is the full path.
    full = targets[-1]
    head = full.split('.', 1)[0]
    if head in aliases:
      full = aliases[head] + full[len(head):]
    else:
      pending, last_field = [], None
      continue
    for t in targets[:-1]:
      if '.' not in t:
        aliases[t] = full
    trailing = comments.get(lineno)
    docs[full] = ' '.join(pending + ([trailing[1]] if trailing else []))
    sections[full] = section
    pending = []
    last_field, last_col = (full, trailing[0]) if trailing else (None, -1)
  return [FieldDoc(name, doc, sections[name]) for name, doc in docs.items()]


def field_docs(source: str | None = None) -> dict[str, str]:
  """Maps 'config.a.b' to the comment that documents it in configs/common.py."""
  return {f.name: f.doc for f in parse_fields(source)}


def flatten(d: dict, prefix: str = '') -> dict:
  """{'model': {'width': 1}} -> {'model.width': 1}; an empty dict stays a leaf."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _cell(text: str) -> str:
  """Text safe inside a Markdown table cell (GFM splits cells at unescaped '|')."""
  return text.replace('|', r'\|').replace('\n', ' ')


def _value(value) -> str:
  if value is None:
    return 'unset'
  return '`' + _cell(repr(value)) + '`'


def markdown(source: str | None = None) -> str:
  """docs/configs.md: every field of the base config, its default and its doc,
  grouped by the sections of common.py, in the order it declares them."""
  from pyra_jax.configs import common  # pylint: disable=g-import-not-at-top
  defaults = flatten(common.get_base_config().to_dict())
  fields = parse_fields(source)
  by_name = {f.name: f for f in fields}
  order = {f.name: i for i, f in enumerate(fields)}

  def position(key: str) -> tuple[int, str]:
    return (order.get(f'config.{key}', len(order)), key)

  out = [
      '# Config fields',
      '',
      '<!-- Generated by `python docs/make_configs.py` from the comments of '
      'pyra_jax/configs/common.py: edit those, then run it. -->',
      '',
      'Every run is one `ml_collections` config: a setting file '
      '(`configs/<setting>.py`, the table in [usage.md](usage.md#settings)) builds it '
      'on the base config of `pyra_jax/configs/common.py`, and any field below can be '
      'overridden on the command line as `--config.<field>=<value>` (a misspelt field '
      'is refused with the valid names). The defaults are the base config\'s: ViT-B/16 + '
      'LoRA + PYRA at high compression on VTAB-1k cifar100, the paper\'s recipe. Each '
      'setting changes some of them; `python -m pyra_jax.main --config=configs/'
      '<setting>.py --helpfull` prints a setting\'s own values. "unset" fields are filled '
      'in when the run starts (from the backbone variant or the task).',
  ]
  groups: dict[str, list[str]] = {}  # Section -> its fields, in declaration order.
  for key in sorted(defaults, key=position):
    info = by_name.get(f'config.{key}')
    groups.setdefault(info.section if info else '', []).append(key)
  for section, keys in groups.items():
    out += ['', f'## {section or "General"}', '']
    for intro in fields:  # Sub-configs declared in this section: their doc.
      sub = intro.name.partition('.')[2]
      if intro.section == section and sub and sub not in defaults and intro.doc:
        out += [f'`{sub}.*`: {intro.doc}', '']
    out += ['| field | default | description |', '|---|---|---|']
    for key in keys:
      info = by_name.get(f'config.{key}')
      out.append(f'| `{key}` | {_value(defaults[key])} | {_cell(info.doc if info else "")} |')
  return '\n'.join(out) + '\n'
