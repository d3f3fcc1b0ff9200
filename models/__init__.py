"""SDT2Net models; importing this package registers them with timm."""
from .checkpoint import adapt_state_dict, unwrap_state_dict
from .flops import analytic_flops, fvcore_flops
from .ftf import pade_sqrtm
from .sdt2net import SDT2Net

__all__ = ['SDT2Net', 'adapt_state_dict', 'unwrap_state_dict', 'analytic_flops', 'fvcore_flops', 'pade_sqrtm']
