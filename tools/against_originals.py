r"""Every PEFT module and competing method against its original authors' code, one table.

  python tools/against_originals.py \
      --methods_python=VENV_A/bin/python --peft_python=VENV_B/bin/python \
      --ltmp=PATH/TO/ltmp --diffrate=PATH/TO/DiffRate --evit=PATH/TO/evit \
      --ats=PATH/TO/ATS --pyra_repo=PATH/TO/PYRA --petl_repo=PATH/TO/PETL-ViT \
      --snf_repo=PATH/TO/SNF [--json=out.json]

Runs the two comparison tools, each in the environment its originals need
(their timm versions differ: LTMP's code pins timm 0.9.5, the PYRA authors'
0.5.4), and prints max |ours - theirs| over the logits per method, on the same
random weights and images, eval mode:

  tools/originals_methods.py  LTMP, DiffRate (deployed and search), EViT, ATS
  tools/originals_peft.py     the PYRA authors' Adapter as their model builds it,
                              Convpass, FacT-TT, FacT-TK, SNF

Each tool's docstring says how its environment is made and what it builds;
the repositories are imported from their checkouts at run time, nothing of
them is copied here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
METHOD_REPOS = ('ltmp', 'diffrate', 'evit', 'ats')
PEFT_REPOS = ('pyra_repo', 'petl_repo', 'snf_repo')


def run_tool(python: str, tool: str, flags: list[str], out_flag: str) -> dict[str, float]:
  """Runs tools/<tool> with `python`; returns its {comparison: max |diff|}."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'out.json')
    subprocess.run([python, os.path.join(HERE, tool), *flags, f'{out_flag}={out}'],
                   check=True)
    with open(out) as f:
      data = json.load(f)
  return data.get('results', data)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--methods_python', default=sys.executable,
                      help='the Python of the environment of tools/originals_methods.py')
  parser.add_argument('--peft_python', default=sys.executable,
                      help='the Python of the environment of tools/originals_peft.py')
  for name in METHOD_REPOS + PEFT_REPOS:
    parser.add_argument(f'--{name}', default='', help=f'checkout of the {name} original')
  parser.add_argument('--json', default='', help='also write the table here')
  args = parser.parse_args(argv)
  results: dict[str, float] = {}
  flags = [f'--{n}={getattr(args, n)}' for n in METHOD_REPOS if getattr(args, n)]
  if flags:
    results.update(run_tool(args.methods_python, 'originals_methods.py', flags, '--out'))
  flags = [f'--{n}={getattr(args, n)}' for n in PEFT_REPOS if getattr(args, n)]
  if flags:
    results.update(run_tool(args.peft_python, 'originals_peft.py', flags, '--json'))
  if not results:
    parser.error('give at least one original repository (see --help)')
  # The comparisons; entries with a '/' are the tools' context (scales, inits).
  shown = {k: v for k, v in results.items() if '/' not in k}
  width = max(len(k) for k in shown)
  print(f'\n{"comparison":<{width}}  max |ours - theirs|')
  for name, value in shown.items():
    print(f'{name:<{width}}  {value:.2e}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
