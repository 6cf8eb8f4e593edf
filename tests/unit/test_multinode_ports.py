"""The multi-node test cluster's S3 ports: weed serves gRPC on unix sockets named by port in the /tmp
every namespace shares, so two clusters up at once must never share a port."""

from __future__ import annotations

from storage import seaweed
from tests.integration.multinode import s3_ports


def test_clusters_on_different_subnets_share_no_s3_port_nor_grpc_socket():
    seen: dict[int, int] = {}
    for octet in range(1, 255):
        for port in s3_ports(octet).values():
            for used in (port, port + 10000):  # the HTTP port and its gRPC port (and socket)
                assert used not in seen, f"octet {octet} and octet {seen[used]} both use port {used}"
                seen[used] = octet
    # Nor with a one-machine embedded server (storage.seaweed picks pairs in its own range).
    low, high = seaweed._PORT_LOW, seaweed._PORT_HIGH
    assert not [port for port in seen if low <= port <= high or low + 10000 <= port <= high + 10000]
    assert max(seen) < 65536
