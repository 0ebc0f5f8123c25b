"""The same-host transport: MPI-style matching by source and tag, sends that never block
their caller, sums that leave identical bits on every rank, and clear failures."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fapool.worker.local_transport import LocalTransport, PeerLost


def _world(n: int) -> list[LocalTransport]:
    """n ranks in this process (threads build them: each waits for the others to connect)."""
    name = f"test-{os.getpid()}-{time.monotonic_ns()}"
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda r: LocalTransport(r, n, name), range(n)))


@pytest.fixture
def pair():
    world = _world(2)
    yield world
    for t in world:
        t.close()


def test_messages_match_by_tag_and_in_posting_order(pair):
    a, b = pair
    sends = [a.send(torch.full((3,), float(v)), 1, tag) for v, tag in [(1, 7), (2, 8), (3, 7)]]
    first7, second7, only8 = torch.empty(3), torch.empty(3), torch.empty(3)
    works = [b.recv(first7, 0, 7), b.recv(second7, 0, 7), b.recv(only8, 0, 8)]
    works[2].wait(5.0)  # tag 8 first: the tag-7 message read before it is kept for its receive
    works[1].wait(5.0)
    works[0].wait(5.0)
    for w in sends:
        w.wait(5.0)
    assert only8.tolist() == [2.0] * 3
    assert first7.tolist() == [1.0] * 3 and second7.tolist() == [3.0] * 3


def test_a_message_that_arrives_before_its_receive_is_posted_is_kept(pair):
    a, b = pair
    a.send(torch.arange(4, dtype=torch.int64), 1, 3).wait(5.0)
    b.send(torch.ones(1), 0, 9).wait(5.0)
    a.recv(torch.empty(1), 1, 9).wait(5.0)  # by now b's socket holds a's message
    out = torch.empty(4, dtype=torch.int64)
    b.recv(out, 0, 3).wait(5.0)
    assert out.tolist() == [0, 1, 2, 3]


def test_large_sends_both_ways_do_not_block_the_senders(pair):
    a, b = pair
    big = 16 << 20  # bytes, past what the socket buffers hold
    xa, xb = torch.randn(big // 4), torch.randn(big // 4)
    sa, sb = a.send(xa, 1, 0), b.send(xb, 0, 0)  # both return before either side receives
    ra, rb = torch.empty_like(xb), torch.empty_like(xa)
    wa, wb = a.recv(ra, 1, 0), b.recv(rb, 0, 0)
    t = threading.Thread(target=wb.wait, args=(30.0,))
    t.start()
    wa.wait(30.0)
    t.join()
    sa.wait(30.0)
    sb.wait(30.0)
    assert torch.equal(ra, xb) and torch.equal(rb, xa)


def test_bf16_and_empty_tensors_travel(pair):
    a, b = pair
    x = torch.randn(5, 3).to(torch.bfloat16)
    a.send(x, 1, 1)
    a.send(torch.empty(0), 1, 2)
    y, z = torch.empty(5, 3, dtype=torch.bfloat16), torch.empty(0)
    b.recv(y, 0, 1).wait(5.0)
    b.recv(z, 0, 2).wait(5.0)
    assert torch.equal(x, y)


def test_all_reduce_leaves_the_same_bits_on_every_rank():
    world = _world(3)
    try:
        xs = [torch.randn(64, 17) * (r + 1) for r in range(3)]
        want = (xs[0] + xs[1]) + xs[2]
        outs = [x.clone() for x in xs]
        works = [t.all_reduce(outs[r], [2, 0, 1]) for r, t in enumerate(world)]
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda w: w.wait(10.0), works))
        for out in outs:
            assert torch.equal(out, want)
    finally:
        for t in world:
            t.close()


def test_a_closed_peer_fails_the_wait_at_once(pair):
    a, b = pair
    w = b.recv(torch.empty(2), 0, 0)
    a.close()
    t = time.monotonic()
    with pytest.raises(PeerLost, match="closed"):
        w.wait(30.0)
    assert time.monotonic() - t < 5.0
    with pytest.raises(PeerLost):  # and the channel stays failed
        b.recv(torch.empty(2), 0, 0).wait(1.0)


def test_a_silent_peer_times_out(pair):
    _, b = pair
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        b.recv(torch.empty(2), 0, 0).wait(0.3)
    assert 0.25 < time.monotonic() - t < 5.0


def test_a_wrongly_sized_message_fails_its_receive(pair):
    a, b = pair
    a.send(torch.zeros(3), 1, 0)
    with pytest.raises(PeerLost, match="12 bytes for a 8-byte"):
        b.recv(torch.empty(2), 0, 0).wait(5.0)
