"""AuG-KD's three stages, the baselines and the run pipeline.

- ``data_free.run_data_free``: Module 1 (generator, encoder, student warm-up; no teacher-domain data)
- ``anchor.run_anchor``: Module 2 (AnchorNet, uncertainty-guided)
- ``mixup.run_mixup``: Module 3 (progressive latent + pixel mixup, KD from the teacher)
- ``supervised.train_supervised``: the teacher recipe and the ce / kd / dfkd baselines
- ``pipeline.run_method``: one method end to end in a run directory (checkpoints, resume, reports);
  ``pipeline.METHODS`` lists each method's stages
- ``losses`` / ``schedules``: the formulas, term by term
"""
from .pipeline import run_method, stage_keys
from .rundir import prepare

__all__ = ["run_method", "stage_keys", "prepare"]
