"""The gRPC listener's TLS: a given certificate reloaded when its files change, or a
self-signed one made at start.

- Given (`--tls-cert`/`--tls-key`, optionally `--tls-client-ca`): served with
  grpc's dynamic server credentials. grpc-core asks `CertificateFiles.fetch`
  for a configuration at every new TLS handshake; it answers None (keep the one
  in force) unless a file's (inode, size, mtime) changed, and then a new
  configuration only once the pair loads and the key matches the certificate.
  So a rotation (cert-manager rewriting a Secret's files, a symlink swap) is
  served from the next connection on, without a restart, and a half-written
  pair is never served: the previous one stays until both files agree.
  Connections already open keep the certificate they were established with.
- Self-signed (`--secure-serving true`, no certificate given): an ECDSA P-256
  key and a certificate valid for ten years, made at start and held in memory,
  as upstream's endpoint picker does. The gateways that dial a picker do not
  verify its certificate (Envoy AI Gateway, kgateway, the Istio
  DestinationRule with `insecureSkipVerify`), so TLS there protects against
  eavesdropping, not impersonation; give a certificate to have both.

`probe_credentials` is the other end, for `extproc health`: it tells a TLS
listener from a plaintext one by a handshake, and trusts whatever certificate
the listener presents (a probe asks whether the process answers, not who it
is). A listener that requires client certificates cannot be probed this way:
probe `--health-listen` instead.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SELF_SIGNED_DAYS = 3650
SELF_SIGNED_NAME = "workload-extproc"


@dataclass(frozen=True)
class KeyPair:
    key: bytes
    cert: bytes
    """PEM private key and certificate chain."""


def self_signed(hostnames: tuple[str, ...] = ()) -> KeyPair:
    """A fresh key and a self-signed certificate naming `hostnames` (and localhost)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SELF_SIGNED_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    names = dict.fromkeys((*hostnames, "localhost"))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(host) for host in names if host]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert.public_bytes(serialization.Encoding.PEM),
    )


class CertificateError(OSError):
    """The files do not hold a usable certificate and matching key (the service cannot serve)."""


def load_pair(cert_path: Path, key_path: Path) -> KeyPair:
    """The pair in these files, checked: the key must be the certificate's."""
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError, TypeError) as error:
        raise CertificateError(f"{cert_path}, {key_path}: {error}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if cert.public_key().public_bytes(encoding, public) != key.public_key().public_bytes(
        encoding, public
    ):
        raise CertificateError(f"{key_path} is not the key of {cert_path}")
    return KeyPair(key_pem, cert_pem)


def _load_authorities(path: Path) -> bytes:
    """The PEM certificates in `path`, checked to parse (grpc-core would fail every handshake)."""
    try:
        pem = path.read_bytes()
        x509.load_pem_x509_certificates(pem)
    except (OSError, ValueError) as error:
        raise CertificateError(f"{path}: {error}") from None
    return pem


def _signature(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...]:
    signature = []
    for path in paths:
        try:
            stat = os.stat(path)  # follows symlinks: a Secret volume swaps ..data
        except OSError:
            signature.append((0, 0, 0))
        else:
            signature.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


class CertificateFiles:
    """A certificate, key (and client CA) on disk, handed to grpc again when they change."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self._cert, self._key, self._client_ca = cert, key, client_ca
        self._paths = tuple(p for p in (cert, key, client_ca) if p is not None)
        self._signature = _signature(self._paths)
        self._refused: tuple[tuple[int, int, int], ...] | None = None
        self.initial = self._configuration()
        self.reloads = 0
        self._log = structlog.get_logger("extproc.tls")

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial,
            self.fetch,  # type: ignore[arg-type]  # grpc documents None as "no change"
            require_client_authentication=self._client_ca is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc-core's question at every handshake: a new configuration, or None."""
        signature = _signature(self._paths)
        if signature in (self._signature, self._refused):
            return None
        try:
            configuration = self._configuration()
        except CertificateError as error:
            # Mid-rotation (one file written, not the other) or broken: keep serving
            # the pair in force and look again once the files change again.
            self._refused = signature
            self._log.warning("certificate not reloaded", error=str(error))
            return None
        self._signature = signature
        self.reloads += 1
        self._log.info("certificate reloaded", cert=str(self._cert))
        return configuration

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = load_pair(self._cert, self._key)
        client_ca = _load_authorities(self._client_ca) if self._client_ca else None
        return grpc.ssl_server_certificate_configuration(
            [(pair.key, pair.cert)], root_certificates=client_ca
        )


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None, secure_serving: bool
) -> grpc.ServerCredentials | None:
    """The listener's credentials: the given files, else self-signed if asked, else None."""
    if cert is not None and key is not None:
        return CertificateFiles(cert, key, client_ca).credentials()
    if secure_serving:
        pair = self_signed((socket.gethostname(),))
        return grpc.ssl_server_credentials([(pair.key, pair.cert)])
    return None


def probe_credentials(
    host: str, port: int, timeout: float
) -> tuple[grpc.ChannelCredentials, str] | None:
    """To dial this listener: credentials trusting the certificate it presents and the
    name to expect in it; None when it does not speak TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=timeout) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                der = tls.getpeercert(binary_form=True)
        except OSError:  # a plaintext HTTP/2 server drops a ClientHello
            return None
    if der is None:
        return None
    cert = x509.load_der_x509_certificate(der)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return grpc.ssl_channel_credentials(root_certificates=pem), _name_in(cert)


def _name_in(cert: x509.Certificate) -> str:
    """A name the certificate is valid for, for the client's hostname check."""
    try:
        alternative = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        alternative = x509.SubjectAlternativeName([])
    names = [str(n) for n in alternative.get_values_for_type(x509.DNSName)]
    names += [str(n) for n in alternative.get_values_for_type(x509.IPAddress)]
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    names += [str(attribute.value) for attribute in common]
    return names[0] if names else "localhost"
