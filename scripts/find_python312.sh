#!/usr/bin/env bash
# Print the path of a Python 3.12 interpreter: python3.12 on PATH, else pyenv's 3.12.x.
set -u
if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  command -v python3.12; exit 0
fi
if command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V -r); do
    p="$(pyenv root)/versions/$v/bin/python3.12"
    if [ -x "$p" ]; then echo "$p"; exit 0; fi
  done
fi
echo "error: Python 3.12 not found. Install it (e.g. 'pyenv install 3.12') or put python3.12 on PATH; JAX 0.11.2 has no wheels for $(python3 --version 2>&1)." >&2
exit 1
