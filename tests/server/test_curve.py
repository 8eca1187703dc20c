"""CURVE keys derived from the shared key: the right client gets through, any other is refused at the handshake."""
from __future__ import annotations

import time

import pytest
import zmq

from engine_server.wire.curve import CurveServer, HandshakeWatch, derive_keys, secure_client


@pytest.fixture
def server():
    ctx = zmq.Context()
    curve = CurveServer(ctx, derive_keys(b"k" * 32))
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    curve.secure(sock)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield ctx, curve, sock, f"tcp://127.0.0.1:{port}"
    sock.close()
    curve.close()
    ctx.term()


def _dial(ctx, endpoint, keys):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if keys is not None:
        secure_client(sock, keys)
    watch = HandshakeWatch(sock)
    sock.connect(endpoint)
    sock.send(b"hello")
    return sock, watch


def _settle(watch, seconds=2.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end and watch.poll() is None:
        time.sleep(0.02)
    return watch.poll()


def test_both_ends_derive_the_same_distinct_key_pairs():
    a, b = derive_keys(b"k" * 32), derive_keys(b"k" * 32)
    assert a == b and len(set(a)) == 4
    assert derive_keys(b"j" * 32).server_public != a.server_public
    assert zmq.curve_public(a.server_secret) == a.server_public


@pytest.mark.parametrize("who", ["another key file", "no CURVE", "our server key, another client key"])
def test_a_client_without_the_key_never_gets_a_message_through_and_is_told_why(server, who):
    ctx, curve, sock, endpoint = server
    ours, theirs = derive_keys(b"k" * 32), derive_keys(b"x" * 32)
    keys = {"another key file": theirs, "no CURVE": None,
            "our server key, another client key": ours._replace(client_public=theirs.client_public,
                                                                client_secret=theirs.client_secret)}[who]
    client, watch = _dial(ctx, endpoint, keys)
    try:
        assert _settle(watch) == HandshakeWatch.REFUSED
        assert not sock.poll(200), "a message from a peer without the key reached the server"
    finally:
        watch.close()
        client.close()


def test_the_derived_client_connects_encrypted_and_its_watch_stays_quiet(server):
    ctx, curve, sock, endpoint = server
    client, watch = _dial(ctx, endpoint, derive_keys(b"k" * 32))
    try:
        assert sock.poll(2000)
        assert sock.recv_multipart()[1:] == [b"hello"]
        assert watch.poll() is None and curve.provider.refused == 0
    finally:
        watch.close()
        client.close()
