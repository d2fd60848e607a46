import math

import pytest
import torch

from megatron_sapo.losses import sapo_gate, sapo_gate_weight, select_tau

from .reference import gate_weight

# Values listed in ../shared/ALGORITHM.md (from the SAPO paper's definition), to the three decimals given there.
PAPER_WEIGHTS = [
    (1.0, 0.8, 0.990), (1.0, 1.5, 0.940), (1.0, 2.0, 0.786), (1.0, 3.0, 0.420), (1.0, 5.0, 0.071),
    (1.05, 1.5, 0.934), (1.05, 2.0, 0.768), (1.05, 5.0, 0.058),
]


@pytest.mark.parametrize("tau,r,expected", PAPER_WEIGHTS)
def test_gate_weight_matches_paper_values(tau, r, expected):
    w = sapo_gate_weight(torch.tensor(r, dtype=torch.float64), tau).item()
    assert round(w, 3) == expected
    assert w == pytest.approx(gate_weight(r, tau), abs=1e-12)


@pytest.mark.parametrize("tau", [0.25, 0.95, 1.0, 1.05, 3.0])
def test_gate_value_and_weight_at_ratio_one(tau):
    one = torch.tensor(1.0, dtype=torch.float64)
    assert sapo_gate(one, tau).item() == pytest.approx(2.0 / tau)
    assert sapo_gate_weight(one, tau).item() == pytest.approx(1.0)


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.05, 2.0])
def test_weight_is_derivative_of_gate(tau):
    r = torch.linspace(0.01, 6.0, 97, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sapo_gate(r, tau).sum(), r)
    torch.testing.assert_close(grad, sapo_gate_weight(r.detach(), tau), rtol=1e-12, atol=1e-12)
    expected = torch.tensor([gate_weight(x, tau) for x in r.tolist()], dtype=torch.float64)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_gate_is_bounded_and_monotone_far_from_one():
    r = torch.tensor([0.0, 1e-6, 50.0, 1e6], dtype=torch.float64)
    f = sapo_gate(r, 1.0)
    assert torch.all(torch.isfinite(f)) and torch.all(f[1:] >= f[:-1])
    assert f[-1].item() == pytest.approx(4.0) and sapo_gate_weight(r, 1.0)[-1].item() == 0.0
    assert f[0].item() == pytest.approx(4 / (1 + math.e))


def test_tau_selection_uses_tau_neg_at_zero_advantage():
    adv = torch.tensor([2.0, 1e-9, 0.0, -0.0, -3.0])
    torch.testing.assert_close(select_tau(adv, 1.0, 1.05), torch.tensor([1.0, 1.0, 1.05, 1.05, 1.05]))
