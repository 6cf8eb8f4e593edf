"""Issue this Ray pod a TLS certificate for Ray's gRPC (RAY_USE_TLS), signed by the release's CA.

Runs in the `ray-tls-certificate` init container. Ray's gRPC peers dial each other by pod IP, so each
pod needs a certificate naming its own IP; the CA's key is mounted into this container only.

Reads: POD_IP, HEAD_SERVICE_DNS, CERTIFICATE_DAYS; /etc/ray/tls-ca/ca.crt and ca.key.
Writes: /etc/ray/tls/tls.crt, tls.key (mode 0600) and ca.crt.
"""

import datetime
import ipaddress
import os
import shutil
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Overridable so that the script can be tested outside a pod.
CA_DIR = os.environ.get("RAY_TLS_CA_DIR", "/etc/ray/tls-ca")
OUT_DIR = os.environ.get("RAY_TLS_OUT_DIR", "/etc/ray/tls")


def main() -> int:
    pod_ip = os.environ.get("POD_IP", "")
    if not pod_ip:
        print("POD_IP is empty: the pod spec must set it from the downward API (status.podIP)", file=sys.stderr)
        return 1
    head_dns = os.environ["HEAD_SERVICE_DNS"]
    days = int(os.environ.get("CERTIFICATE_DAYS", "365"))
    with open(os.path.join(CA_DIR, "ca.crt"), "rb") as handle:
        ca_certificate = x509.load_pem_x509_certificate(handle.read())
    with open(os.path.join(CA_DIR, "ca.key"), "rb") as handle:
        ca_key = serialization.load_pem_private_key(handle.read(), password=None)

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.IPAddress(ipaddress.ip_address(pod_ip)), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.DNSName("localhost"), x509.DNSName(head_dns), x509.DNSName(head_dns + ".cluster.local")]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, pod_ip)]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        # Every Ray process is both a gRPC server and a client.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_path = os.path.join(OUT_DIR, "tls.key")
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    with open(os.path.join(OUT_DIR, "tls.crt"), "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))
    shutil.copyfile(os.path.join(CA_DIR, "ca.crt"), os.path.join(OUT_DIR, "ca.crt"))
    print(f"issued a Ray TLS certificate for {pod_ip} valid {days} days")
    return 0


if __name__ == "__main__":
    sys.exit(main())
