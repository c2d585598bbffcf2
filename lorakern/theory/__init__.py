"""Theory helpers from the papers in ../shared/papers (API.md "Theory"), all numerically stable, in float64.

rank_accuracy (rank-accuracy-gradient-flow.txt): Eckart-Young-Mirsky `eym_tail` and `select_rank` (Thm 2.11),
the trace-squared gradient flow in closed form (`trace_sq_coeffs`, `trace_sq_residual`, `trace_sq_flow`,
`trace_sq_limit`, `trace_sq_full_rank`), its limit error `trace_sq_rel_err` (33) and expectation
`expected_trace_sq_rel_err` (34)-(35), and the spectral-init Frobenius flow `frobenius_spectral_flow`.
convergence (lora-gd-convergence-rate.txt): `safe_step_size` (rule (8)), `convergence_bounds` (10)-(12),
`DescentMonitor` (checks inequality (9) each step), `adapter_sq_norm` / `adapter_grad_sq_norm`.
Layout: lora_A (r, in), lora_B (out, r); the papers' X / A is lora_A and Y / B is lora_B.
"""
from lorakern.theory.convergence import (ConvergenceBounds, DescentMonitor, DescentViolationWarning,
                                         adapter_grad_sq_norm, adapter_sq_norm, convergence_bounds,
                                         safe_step_size)
from lorakern.theory.rank_accuracy import (EYMTail, expected_trace_sq_rel_err, eym_tail, frobenius_spectral_flow,
                                           select_rank, trace_sq_coeffs, trace_sq_flow, trace_sq_full_rank,
                                           trace_sq_limit, trace_sq_rel_err, trace_sq_residual)

__all__ = [
    "eym_tail", "EYMTail", "select_rank", "expected_trace_sq_rel_err", "trace_sq_rel_err", "trace_sq_coeffs",
    "trace_sq_residual", "trace_sq_flow", "trace_sq_limit", "trace_sq_full_rank", "frobenius_spectral_flow",
    "safe_step_size", "convergence_bounds", "ConvergenceBounds", "DescentMonitor", "DescentViolationWarning",
    "adapter_sq_norm", "adapter_grad_sq_norm",
]
