"""The SeaweedFS test server: private ports, so parallel sessions on one machine never collide."""

from __future__ import annotations

import socket

import pytest

from tests.s3server import GRPC_OFFSET, PortInUseError, SeaweedFS, pick_ports


def test_two_servers_side_by_side(s3_server: SeaweedFS) -> None:
    with SeaweedFS() as other:
        ours = set(s3_server.ports.values()) | {p + GRPC_OFFSET for p in s3_server.ports.values()}
        theirs = set(other.ports.values()) | {p + GRPC_OFFSET for p in other.ports.values()}
        assert not ours & theirs
        a, b = s3_server.create_bucket(), other.create_bucket()
        other.client().put_object(Bucket=b, Key="k", Body=b"other")  # type: ignore[attr-defined]
        s3_server.client().put_object(Bucket=a, Key="k", Body=b"ours")  # type: ignore[attr-defined]
        assert other.client().get_object(Bucket=b, Key="k")["Body"].read() == b"other"  # type: ignore[attr-defined]
        names = {x["Name"] for x in other.client().list_buckets()["Buckets"]}  # type: ignore[attr-defined]
        assert a not in names


def test_every_listener_is_on_the_command_line() -> None:
    server = SeaweedFS()
    try:
        server.ports = pick_ports()
        cmd = " ".join(server.command())
        for component, port in server.ports.items():
            assert f"-{component}.port={port}" in cmd and f"-{component}.port.grpc={port + GRPC_OFFSET}" in cmd
        for off in ("-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false"):
            assert off in cmd
    finally:
        server.close()


def test_a_taken_port_is_named() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        server = SeaweedFS(ports={**pick_ports(), "s3": taken})
        try:
            with pytest.raises(PortInUseError, match=f"port {taken} \\(s3\\) is already in use"):
                server.start()
        finally:
            server.close()
