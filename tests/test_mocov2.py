"""MoCo v2: momentum update, queue wrap-around, loss against a hand computation, precision switches."""

import copy

import torch
import torch.nn.functional as F

from interclr_cli.config import load_config
from interclr_cli.methods import build_method

TINY = [
    "model.arch=resnet18",
    "model.small_stem=false",
    "model.head_hidden=32",
    "model.embed_dim=8",
    "method.queue_size=10",
]


def _method(*extra):
    torch.manual_seed(0)
    return build_method(load_config("mocov2-r18-cifar", TINY + list(extra)), 100)


def _batch(b=4, size=16):
    x = torch.randn(b, 3, size, size)
    return {
        "view1": x,
        "view2": torch.randn(b, 3, size, size),
        "index": torch.arange(b),
        "label": torch.zeros(b, dtype=torch.long),
    }


def test_key_encoder_starts_as_a_copy_without_gradients():
    m = _method()
    for (nq, pq), (nk, pk) in zip(m.encoder_q.named_parameters(), m.encoder_k.named_parameters()):
        assert nq == nk and torch.equal(pq, pk) and not pk.requires_grad


def test_momentum_update_formula():
    m = _method("method.momentum=0.9")
    k_before = copy.deepcopy(list(m.encoder_k.parameters()))
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    m.momentum_update()
    for pk0, pq, pk in zip(k_before, m.encoder_q.parameters(), m.encoder_k.parameters()):
        assert torch.allclose(pk, 0.9 * pk0 + 0.1 * pq, atol=1e-6)


def test_queue_wraps_around():
    m = _method()  # K = 10
    K = m.queue.shape[0]
    a = F.normalize(torch.randn(4, 8), dim=1)
    b = F.normalize(torch.randn(4, 8), dim=1)
    c = F.normalize(torch.randn(4, 8), dim=1)
    m.enqueue(a)
    m.enqueue(b)
    assert int(m.queue_ptr) == 8
    m.enqueue(c)  # rows 8, 9, then 0, 1
    assert int(m.queue_ptr) == 2
    assert torch.equal(m.queue[8:10], c[:2]) and torch.equal(m.queue[0:2], c[2:])
    assert torch.equal(m.queue[2:4], a[2:]) and torch.equal(m.queue[4:8], b)
    assert K == 10


def test_loss_matches_hand_computation():
    m = _method("method.intra.temperature=0.2")
    batch = _batch()
    m.eval()  # deterministic BN so the forward passes can be repeated
    loss, _ = m.training_step(batch, 0, 0)
    with torch.no_grad():
        q = F.normalize(m.encoder_q(batch["view1"]), dim=1)
        k = F.normalize(m.encoder_k(batch["view2"]), dim=1)
        queue = m.queue
        expect = 0.0
        for i in range(4):  # -log softmax of the positive among [k_i, queue...], one row at a time
            logits = torch.cat([(q[i] @ k[i]).view(1), queue @ q[i]]) / 0.2
            expect += -(logits[0] - torch.logsumexp(logits, 0))
        expect /= 4
    assert torch.allclose(loss, expect, atol=1e-5)


def test_after_step_enqueues_the_keys():
    m = _method()
    batch = _batch()
    loss, logs = m.training_step(batch, 0, 0)
    loss.backward()
    k = m._pending_keys.clone()
    m.after_optimizer_step(0)
    assert torch.allclose(m.queue[:4], k) and int(m.queue_ptr) == 4
    assert set(logs) == {"loss_intra"}


def test_bf16_autocast_and_channels_last_on_cpu():
    m = _method().to(memory_format=torch.channels_last)
    batch = _batch()
    batch["view1"] = batch["view1"].to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.training_step(batch, 0, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert m.encoder_q.backbone.conv1.weight.grad is not None
    assert m.encoder_q.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
