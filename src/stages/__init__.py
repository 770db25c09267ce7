"""The pipeline stages, one module per `dvc.yaml` stage: `python -m src.stages.<stage>`.

A stage reads its params (`src.config.params.stage_params`), calls library functions from `src/`, and
writes its outputs. Stages never import each other; what they share lives in `src/`.
"""
