"""The study: the main job (`run`) around the trained models — generation, audit, release and EF parity.

- `models`: the run's trained models and its cohort, each loaded (decoded) once and passed down.
- `centralized`: the baseline that trains a stage on the pooled data (the federation is the default).
- `generate`: the one recipe that samples, screens, animates and decodes synthetic videos.
- `evaluate`: held-out measurements of the models, the EF-regression parity, and their metrics.
- `summary`: the run's summary page; `run`: the main job, its resumable steps and their markers.
"""
