"""SoRA's tools beyond the module under the short name users import: `vbshare.sora.sparsify`, `prune`, ...

Everything SoRA does is written once, in `vbshare/adapters/sora.py`; this module only names its public tools.
"""
from .adapters.sora import (
    SCHEDULES,
    SparsifySchedule,
    prune,
    read_records,
    retained_parameters,
    retained_ranks,
    set_lambda,
    sparsify,
)

__all__ = ["SCHEDULES", "SparsifySchedule", "prune", "read_records", "retained_parameters", "retained_ranks",
           "set_lambda", "sparsify"]
