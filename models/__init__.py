"""SDT2Net models; importing this package registers them with timm."""
from .checkpoint import adapt_state_dict, unwrap_state_dict
from .flops import ModelShape, analytic_flops, fvcore_flops
from .sqrtm import pade_sqrtm
from .schedule import BUDGET_TOLERANCE, Schedule, flops_range, onto_budget, smallest_schedule, uniform_schedule
from .sdt2net import SDT2Net
from .tracing import export_numerics
from .from_timm import from_vit, input_normalization, vit_arguments

__all__ = ['SDT2Net', 'Schedule', 'ModelShape', 'adapt_state_dict', 'unwrap_state_dict', 'analytic_flops',
           'fvcore_flops', 'export_numerics', 'pade_sqrtm', 'flops_range', 'smallest_schedule', 'uniform_schedule',
           'onto_budget', 'BUDGET_TOLERANCE', 'from_vit',
           'input_normalization', 'vit_arguments']
