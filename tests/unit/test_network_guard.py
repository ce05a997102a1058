"""The test suite refuses network access beyond loopback, and runs with the hub offline."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import NetworkAccessError


def test_non_loopback_connection_is_blocked_and_recorded(network_attempts):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(NetworkAccessError):
            sock.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed; blocked before any packet anyway
    assert network_attempts == ["connect to ('192.0.2.1', 80)"]
    network_attempts.clear()  # this test wanted the attempt; others fail on one


def test_loopback_is_allowed(network_attempts):
    """Under the guard, a connection to 127.0.0.1 (connect and connect_ex) really works: bytes go both ways."""
    from tests.conftest import _guarded_connect, _guarded_connect_ex

    assert socket.socket.connect is _guarded_connect and socket.socket.connect_ex is _guarded_connect_ex
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(2)
        with socket.create_connection(server.getsockname(), timeout=60) as client:
            accepted, _ = server.accept()
            with accepted:
                client.sendall(b"ping")
                assert accepted.recv(4, socket.MSG_WAITALL) == b"ping"
                accepted.sendall(b"pong")
                assert client.recv(4, socket.MSG_WAITALL) == b"pong"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.settimeout(60)
            assert client.connect_ex(server.getsockname()) == 0
            accepted, _ = server.accept()
            with accepted:
                accepted.sendall(b"ok")
                assert client.recv(2, socket.MSG_WAITALL) == b"ok"
    assert network_attempts == []


def test_hub_is_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    from transformers import AutoConfig

    # A Hub id on purpose: offline mode must refuse it without touching the network (the guard would fail the test).
    hub_only_id = "some-org/" + "some-model-that-would-need-the-hub"
    with pytest.raises(OSError):
        AutoConfig.from_pretrained(hub_only_id)
