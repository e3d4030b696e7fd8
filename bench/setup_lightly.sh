#!/usr/bin/env bash
# The benchmark's own environment for lightly (never a dependency of gelato): a venv that sees
# gelato's .venv packages (torch, torchvision...) through a .pth file and adds lightly 1.6.0 on top.
set -euo pipefail
cd "$(dirname "$0")/.."
env=bench/.venv-lightly
if [ ! -x "$env/bin/python" ]; then
  python3 -m venv "$env"
fi
site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
base=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$base" > "$site/gelato_env.pth"
"$env/bin/python" -c 'import lightly' 2>/dev/null || "$env/bin/pip" install -q lightly==1.6.0
"$env/bin/python" -c 'import lightly; print("lightly", lightly.__version__)'
