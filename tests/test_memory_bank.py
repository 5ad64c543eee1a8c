"""MemoryBank: update rule (m = 1, m = 0.5), duplicates, bf16 storage, similarity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interclr_cli.memory import MemoryBank, last_occurrence
from interclr_cli.memory.bank import run_starts

pytestmark = pytest.mark.usefixtures("one_thread")


def _bank(n=20, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = MemoryBank(n, d, dtype=dtype)
    init = torch.randn(n, d, generator=g, dtype=torch.float64)
    bank.fill(init.float())
    return bank, F.normalize(init, dim=1), g


def test_fill_normalises_and_is_a_buffer():
    bank, ref, _ = _bank()
    assert torch.allclose(bank.features.double(), ref, atol=1e-6)
    assert "features" in bank.state_dict()
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(20), atol=1e-6)


def test_update_momentum_one_replaces_rows():
    bank, ref, g = _bank()
    idx = torch.tensor([3, 7, 11])
    keys = torch.randn(3, 8, generator=g) * 5  # not normalised
    bank.update(idx, keys, 1.0)
    want = ref.clone()
    want[idx] = F.normalize(keys.double(), dim=1)
    assert torch.allclose(bank.features.double(), want, atol=1e-6)


def test_update_momentum_half_hand_computed():
    bank, ref, g = _bank()
    idx = torch.tensor([0, 5])
    keys = torch.randn(2, 8, generator=g)
    bank.update(idx, keys, 0.5)
    want = ref.clone()
    for j, i in enumerate(idx.tolist()):
        mixed = 0.5 * ref[i] + 0.5 * keys[j].double() / keys[j].double().norm()
        want[i] = mixed / mixed.norm()
    assert torch.allclose(bank.features.double(), want, atol=1e-6)


@pytest.mark.parametrize("momentum", [1.0, 0.5])
def test_duplicate_indices_last_occurrence_wins(momentum):
    bank, ref, g = _bank()
    idx = torch.tensor([4, 9, 4, 2, 4])
    keys = torch.randn(5, 8, generator=g)
    bank.update(idx, keys, momentum)
    want = ref.clone()
    for i, j in ((4, 4), (9, 1), (2, 3)):  # row -> position of its last occurrence
        k = keys[j].double() / keys[j].double().norm()
        mixed = (1 - momentum) * ref[i] + momentum * k
        want[i] = mixed / mixed.norm()
    assert torch.allclose(bank.features.double(), want, atol=1e-6)


def test_last_occurrence_matches_python():
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 15, (60,), generator=g)
    vals, pos = last_occurrence(idx)
    last = {}
    for p, v in enumerate(idx.tolist()):
        last[v] = p
    assert vals.tolist() == sorted(idx.tolist())  # fixed shape: every entry, sorted
    assert pos.tolist() == [last[v] for v in sorted(idx.tolist())]  # each repeat -> its last position
    assert run_starts(vals).sum().item() == len(last)


def test_bf16_storage():
    bank16, ref, g = _bank(dtype=torch.bfloat16)
    bank32, _, _ = _bank(dtype=torch.float32)
    assert bank16.features.dtype == torch.bfloat16
    assert bank16.features.element_size() * 2 == bank32.features.element_size()
    idx = torch.tensor([1, 2])
    keys = torch.randn(2, 8, generator=g)
    for b in (bank16, bank32):
        b.update(idx, keys, 0.5)
    # rows agree to bf16 precision (8-bit mantissa: relative error <= 2^-8 per coordinate)
    assert torch.allclose(bank16.features.float(), bank32.features, atol=2**-8, rtol=0)
    assert bank16.features.dtype == torch.bfloat16
    q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    s16, s32 = bank16.similarity(q), bank32.similarity(q)
    assert s16.dtype == torch.float32
    assert (s16 - s32).abs().max() < 4e-3


def test_similarity_matches_matmul_and_out_buffer():
    bank, ref, g = _bank(n=33)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    out = torch.empty(4, 33)
    got = bank.similarity(q, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.allclose(got.double(), q.double() @ ref.t(), atol=1e-6)


def test_scratch_similarity_reuses_one_buffer_per_batch_size():
    bank, ref, g = _bank(n=33)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    first = bank.scratch_similarity(q)
    assert torch.allclose(first.double(), q.double() @ ref.t(), atol=1e-6)
    ptr = first.data_ptr()
    q2 = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    again = bank.scratch_similarity(q2)
    assert again.data_ptr() == ptr  # the same buffer, overwritten
    assert torch.allclose(again.double(), q2.double() @ ref.t(), atol=1e-6)
    other = bank.scratch_similarity(q2[:3])  # another batch size: a buffer of its shape
    assert other.shape == (3, 33) and torch.allclose(other, again[:3])


def test_rejects_bad_momentum():
    bank, _, _ = _bank()
    with pytest.raises(ValueError):
        bank.update(torch.tensor([0]), torch.randn(1, 8), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_sim", [True, False])
def test_cosine_values_and_gradient_match_the_gather(dtype, use_sim):
    bank, _, g = _bank(n=50, dtype=dtype)
    q0 = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    idx = torch.randint(0, 50, (3, 17), generator=g)
    w = torch.randn(3, 17, generator=g)
    q = q0.clone().requires_grad_()
    sim = bank.similarity(q.detach()) if use_sim else None
    got = bank.cosine(q, idx, sim)
    (got * w).sum().backward()
    q2 = q0.clone().requires_grad_()
    want = torch.bmm(bank.features[idx].float(), q2.unsqueeze(2)).squeeze(2)
    (want * w).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(q.grad, q2.grad, atol=1e-4)
