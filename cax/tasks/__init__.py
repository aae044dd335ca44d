"""Task registry: one class per duty, run in the default order of cax.config.DEFAULT_TASKS."""
from cax.config import DEFAULT_TASKS

TASK_NAMES = tuple(DEFAULT_TASKS)
