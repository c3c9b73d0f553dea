"""The job kinds of every stage, by name only: ``medart_core.jobs`` reads this table and registers each kind
without importing its module (a stage's module loads when such a job is submitted or run, so the job
machinery never imports a stage).

Each entry names ``"module:function"`` strings: ``run`` (runs in the job process), ``prepare`` (validates
the config at submit), and optional hooks: ``resume_hint(job) -> str`` (the clause an ``interrupted``
job's message ends with), ``add_submit_arguments(parser)`` and ``submit_config(args) -> dict`` (a
``jobs submit KIND`` sub-command, with ``submit_help``); ``fans_out`` (run instead of ``run`` on a Slurm
executor: a local coordinator of a Slurm job array, :mod:`medart_core.fanout`).
"""
from __future__ import annotations

KINDS: tuple[dict[str, object], ...] = (
    {"name": "train", "run": "medart_core.train_job:run_train_job", "uses_gpu": True,
     "prepare": "medart_core.train_job:prepare_train", "resume_hint": "medart_core.train_job:resume_hint",
     "submit_help": "a training run (same options as `train`)",
     "add_submit_arguments": "medart_core.commands.train:add_submit_arguments",
     "submit_config": "medart_core.commands.train:submit_config"},
    {"name": "sleep", "run": "medart_core.jobs.sleep:run_sleep_job", "uses_gpu": False,
     "prepare": "medart_core.jobs.sleep:prepare_sleep",
     "submit_help": "a cheap diagnostic job (queue, stop and resume checks)",
     "add_submit_arguments": "medart_core.commands.jobs:add_sleep_arguments",
     "submit_config": "medart_core.commands.jobs:sleep_config"},
    {"name": "evaluate", "run": "medart_core.evaluate:run_evaluate_job", "uses_gpu": True,
     "prepare": "medart_core.evaluate:prepare_evaluate_job",
     "fans_out": "medart_core.fanout:run_evaluate_job_array"},
    {"name": "generate", "run": "medart_core.generate:run_generate_job", "uses_gpu": True,
     "prepare": "medart_core.generate:prepare_generate_job",
     "fans_out": "medart_core.fanout:run_generate_job_array"},
    {"name": "ablation", "run": "medart_core.ablation:run_ablation_job", "uses_gpu": True,
     "prepare": "medart_core.ablation:prepare_ablation_job",
     "fans_out": "medart_core.fanout:run_ablation_job_array"},
)

# Targets that job rows written by older versions store (``jobs.target``): a resumed attempt of such a row
# runs the function's new home.
LEGACY_TARGETS: dict[str, str] = {
    "medart_core.jobs:run_train_job": "medart_core.train_job:run_train_job",
    "medart_core.jobs:prepare_train": "medart_core.train_job:prepare_train",
    "medart_core.jobs:run_sleep_job": "medart_core.jobs.sleep:run_sleep_job",
    "medart_core.jobs:prepare_sleep": "medart_core.jobs.sleep:prepare_sleep",
}
