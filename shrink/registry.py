"""The method API for plugins (kept for third-party code): a thin re-export.

    from shrink.registry import register, Strict, StepResult, Context
"""

from shrink.methods.base import METHODS, Context, Method, NoTarget, Plan, StepResult, Strict, register  # noqa: F401
from shrink.methods.catalog import all_methods, get_method  # noqa: F401
