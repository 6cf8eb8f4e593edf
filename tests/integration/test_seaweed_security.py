"""The embedded S3 server gives a local user without its secrets nothing but S3's "access denied".

Every port of ``weed mini`` listens on loopback, where any user of the machine reaches it. Only S3
with credentials may reach the data: the filer's and master's HTTP APIs, the volume server's chunk
URLs and the gRPC ports (HTTP port + 10000) must refuse a caller without the server's secrets.
A freshly started server on a temporary directory, stopped by the fixture.
"""

from __future__ import annotations

import io
import secrets
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from minio import Minio
from minio.error import S3Error

from storage.seaweed import start_embedded_s3

grpc = pytest.importorskip("grpc")

GRPC_OFFSET = 10000
CONTENT = b'{"state": "done", "secret": "' + secrets.token_hex(8).encode() + b'"}'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = start_embedded_s3(tmp_path_factory.mktemp("s3-security") / "data",
                                access_key="sec" + secrets.token_hex(4), secret_key=secrets.token_urlsafe(24))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def client(server) -> Minio:
    return Minio(server.endpoint, access_key=server.access_key, secret_key=server.secret_key, secure=False)


@pytest.fixture
def bucket(client) -> str:
    """A fresh bucket holding one object, ``state/doc.json`` (a bucket is a SeaweedFS collection)."""
    name = "sec-" + secrets.token_hex(5)
    client.make_bucket(name)
    client.put_object(name, "state/doc.json", io.BytesIO(CONTENT), len(CONTENT))
    return name


def _http(method: str, url: str, data: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one request without credentials; status None: connection refused."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()
    except (ConnectionRefusedError, urllib.error.URLError) as error:
        if isinstance(error, ConnectionRefusedError) or isinstance(getattr(error, "reason", None),
                                                                    ConnectionRefusedError):
            return None, {}, b""
        raise


def _assert_refused(result, what: str) -> None:
    status, headers, body = result
    assert status is None or status in (401, 403, 404, 405), f"{what} answered {status}: {body[:200]!r}"
    assert CONTENT not in body, f"{what} returned the object's content"
    assert "Authorization" not in headers, f"{what} handed out a token: {headers['Authorization']}"


def _assert_intact(client: Minio, bucket: str) -> None:
    assert client.get_object(bucket, "state/doc.json").read() == CONTENT
    assert [o.object_name for o in client.list_objects(bucket, recursive=True)] == ["state/doc.json"]


# --- a minimal protobuf codec for the few gRPC messages used here ------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, text: str) -> bytes:
    data = text.encode()
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _fields(message: bytes) -> list[tuple[int, bytes | int]]:
    """(field number, value) of every field: bytes for length-delimited ones, int for varints."""
    out, position = [], 0

    def read_varint() -> int:
        nonlocal position
        value, shift = 0, 0
        while True:
            byte = message[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while position < len(message):
        key = read_varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            out.append((number, read_varint()))
        elif wire_type == 2:
            length = read_varint()
            out.append((number, message[position:position + length]))
            position += length
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        else:
            raise ValueError(f"unexpected wire type {wire_type}")
    return out


def _list_entries(channel, directory: str) -> list[str]:
    """Names in a filer directory (filer_pb.SeaweedFiler/ListEntries: request field 1 is the
    directory; each response's field 1 is an Entry whose field 1 is the name)."""
    call = channel.unary_stream("/filer_pb.SeaweedFiler/ListEntries")
    names = []
    for response in call(_field(1, directory), timeout=15):
        entry = dict(_fields(response))[1]
        names.append(dict(_fields(entry))[1].decode())
    return names


def _chunk_file_ids(channel, directory: str, name: str) -> list[str]:
    """File ids of an entry's chunks (LookupDirectoryEntry: directory=1, name=2; the response's
    entry=1, the entry's chunks=3, each chunk's file_id=1)."""
    call = channel.unary_unary("/filer_pb.SeaweedFiler/LookupDirectoryEntry")
    response = call(_field(1, directory) + _field(2, name), timeout=15)
    entry = dict(_fields(response))[1]
    return [dict(_fields(chunk))[1].decode() for number, chunk in _fields(entry) if number == 3]


def _authorized_channel(server, port: int):
    environment = server.grpc_client_environment()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(environment["WEED_GRPC_CA"]).read_bytes(),
        private_key=Path(environment["WEED_GRPC_CLIENT_KEY"]).read_bytes(),
        certificate_chain=Path(environment["WEED_GRPC_CLIENT_CERT"]).read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


# --- the tests --------------------------------------------------------------------------------------

def test_s3_with_credentials_still_lists_puts_gets_and_deletes(client, bucket):
    _assert_intact(client, bucket)
    large = secrets.token_bytes(9 * 1024 * 1024)  # several chunks of the filer's 4 MB
    client.put_object(bucket, "models/lora.bin", io.BytesIO(large), len(large))
    assert client.get_object(bucket, "models/lora.bin").read() == large
    client.remove_object(bucket, "models/lora.bin")
    _assert_intact(client, bucket)


def test_s3_without_credentials_is_denied(server, bucket):
    anonymous = Minio(server.endpoint, secure=False)
    with pytest.raises(S3Error, match="AccessDenied"):
        anonymous.get_object(bucket, "state/doc.json")
    wrong = Minio(server.endpoint, access_key=server.access_key, secret_key="not-the-secret", secure=False)
    with pytest.raises(S3Error, match="SignatureDoesNotMatch"):
        list(wrong.list_objects(bucket, recursive=True))


def test_filer_http_lists_reads_plants_and_deletes_nothing(server, client, bucket):
    filer = f"http://127.0.0.1:{server.ports.filer}/buckets/{bucket}"
    _assert_refused(_http("GET", f"{filer}/state/"), "a filer directory listing")
    _assert_refused(_http("GET", f"{filer}/state/?pretty=y", headers={"Accept": "application/json"}),
                    "a filer JSON listing")
    _assert_refused(_http("GET", f"{filer}/state/doc.json"), "a filer read")
    _assert_refused(_http("PUT", f"{filer}/state/planted.json", data=b'{"state": "forged"}'), "a filer PUT")
    _assert_refused(_http("DELETE", f"{filer}/state/doc.json"), "a filer DELETE")
    _assert_intact(client, bucket)


def test_master_http_hands_out_no_file_tokens_and_deletes_no_collection(server, client, bucket):
    master = f"http://127.0.0.1:{server.ports.master}"
    _assert_refused(_http("GET", f"{master}/dir/assign"), "the master's /dir/assign")
    _assert_refused(_http("GET", f"{master}/dir/lookup?fileId=1,01&read=yes"), "the master's /dir/lookup")
    _assert_refused(_http("GET", f"{master}/vol/status"), "the master's /vol/status")
    _assert_refused(_http("GET", f"{master}/col/delete?collection={bucket}"), "the master's /col/delete")
    _assert_intact(client, bucket)


def test_volume_http_serves_and_deletes_no_chunk_without_a_signed_token(server, client, bucket):
    with _authorized_channel(server, server.ports.filer + GRPC_OFFSET) as channel:
        file_ids = _chunk_file_ids(channel, f"/buckets/{bucket}/state", "doc.json")
    assert file_ids, "the object has no chunk on a volume server: the test would prove nothing"
    volume = f"http://127.0.0.1:{server.ports.volume}"
    forged = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJmaWQiOiIxLDAxIn0."
              "c2lnbmVkLXdpdGgtYS1ndWVzc2VkLWtleQ")
    for file_id in file_ids:
        _assert_refused(_http("GET", f"{volume}/{file_id}"), f"a volume read of {file_id}")
        _assert_refused(_http("GET", f"{volume}/{file_id}", headers={"Authorization": f"Bearer {forged}"}),
                        f"a volume read of {file_id} with a forged token")
        _assert_refused(_http("DELETE", f"{volume}/{file_id}"), f"a volume DELETE of {file_id}")
        _assert_refused(_http("POST", f"{volume}/{file_id}", data=b"overwritten"), f"a volume write of {file_id}")
    _assert_intact(client, bucket)


@pytest.mark.parametrize("component", ["master", "volume", "filer", "s3", "admin"])
def test_grpc_ports_refuse_clients_without_the_servers_certificate(server, client, bucket, component):
    port = getattr(server.ports, component) + GRPC_OFFSET
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            _list_entries(channel, f"/buckets/{bucket}/state")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    # TLS that trusts the server but shows no client certificate is refused as well.
    ca = Path(server.grpc_client_environment()["WEED_GRPC_CA"]).read_bytes()
    with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=ca)) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            _list_entries(channel, f"/buckets/{bucket}/state")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    _assert_intact(client, bucket)


def test_grpc_with_the_servers_client_certificate_works(server, bucket):
    """The control for the refusals above: the same call with the certificate lists the object."""
    with _authorized_channel(server, server.ports.filer + GRPC_OFFSET) as channel:
        assert _list_entries(channel, f"/buckets/{bucket}/state") == ["doc.json"]


def test_secrets_and_logs_are_private_to_the_user(server):
    data_dir = Path(server.data_dir)
    assert data_dir.stat().st_mode & 0o077 == 0
    for path in [data_dir / "security", *(data_dir / "security").iterdir()]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    # weed's own log files (they name buckets and object keys) stay in the private data dir.
    assert list((data_dir / "logs").glob(f"weed.*.{server.pid}"))
    assert not list(Path(tempfile.gettempdir()).glob(f"weed.*.{server.pid}"))
