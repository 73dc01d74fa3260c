r"""Writes docs/configs.md, the reference of every config field, from configs/common.py.

  python docs/make_configs.py           # (re)write docs/configs.md
  python docs/make_configs.py --check   # exit 1 if docs/configs.md is stale

The page is generated, never edited by hand: a field's documentation is the
comment beside its declaration in pyra_jax/configs/common.py (read by
pyra_jax.config_docs, which `--helpfull` uses too). tests/test_docs.py checks
that the committed page is what this script writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / 'docs' / 'configs.md'


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true',
                      help='only check that docs/configs.md is up to date')
  args = parser.parse_args(argv)
  sys.path.insert(0, str(ROOT))
  from pyra_jax import config_docs  # pylint: disable=g-import-not-at-top
  text = config_docs.markdown()
  if args.check:
    if PAGE.exists() and PAGE.read_text() == text:
      return 0
    print('Error: docs/configs.md is stale: run `python docs/make_configs.py`.',
          file=sys.stderr)
    return 1
  PAGE.write_text(text)
  print(f'wrote {PAGE.relative_to(ROOT)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
