#!/usr/bin/env bash
# Source this on a bare GPU machine (offline) from the repo root, with .carry/ carried along:
# installs the carried wheels it lacks (hydra, omegaconf) and makes the packages importable
# under their import names without a build (fp4_ablate -> cli/, fp4_experiments -> experiments/).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
mkdir -p /tmp/pkgs
ln -sfn "$PWD/fp4" /tmp/pkgs/fp4
ln -sfn "$PWD/cli" /tmp/pkgs/fp4_ablate
ln -sfn "$PWD/experiments" /tmp/pkgs/fp4_experiments
ln -sfn "$PWD/configs" /tmp/pkgs/fp4_configs
export PYTHONPATH=/tmp/pkgs:/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
fp4-ablate() { python3 -m fp4_ablate "$@"; }
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
set +e
