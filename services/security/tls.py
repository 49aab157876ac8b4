"""Transport security settings: TLS for every gRPC server and channel, and for Redis.

The CLI builds them once from flags and the environment (`add_tls_flags`,
`add_redis_tls_flags`, then `tls_config` / `redis_tls_config`) and passes them down;
services/rpc/plumbing.py turns them into server and channel credentials. A cluster is secured as
a whole: one cluster CA signs the certificate of every router and worker.

    --tls-cert / --tls-key   this process's certificate chain and key (PEM). A server
                             serves TLS with them; every call it makes to another
                             slotmesh server presents them as its client certificate.
    --tls-ca                 the CA bundle that servers this process dials must chain to
                             (and client certificates, with --tls-require-client-cert).
                             Unset on a TLS process: the system's roots.
    --tls-require-client-cert  the server completes no handshake without a client
                             certificate that chains to --tls-ca (mutual TLS).
    --tls-server-name        the name expected in the certificates of the servers this
                             process dials (default: the host of the address), for
                             clusters whose certificates carry one service name rather
                             than every pod's address.

Bad values are refused at startup with InvalidRequestError naming the flag (exit 2).
Files are checked with the standard library's ssl module (a certificate that is not PEM,
a key that does not match it), so the router image needs nothing more.
"""

from __future__ import annotations

import argparse
import os
import ssl
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from worker.vocab.errors import InvalidRequestError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelTls:
    """What a TLS channel needs: the roots to verify the server with (None: the
    system's), an optional client certificate and key (mutual TLS), and an optional name
    to expect in the server's certificate instead of the address's host."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    @classmethod
    def from_files(cls, *, ca: str | Path | None = None, cert: str | Path | None = None,
                   key: str | Path | None = None, server_name: str | None = None
                   ) -> ChannelTls:
        return cls(root_certificates=_read(ca), certificate_chain=_read(cert),
                   private_key=_read(key), server_name=server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates,
                                            private_key=self.private_key,
                                            certificate_chain=self.certificate_chain)

    def options(self) -> tuple[tuple[str, str], ...]:
        return (("grpc.ssl_target_name_override", self.server_name),) if self.server_name \
            else ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """One process's TLS settings (file contents, read once at startup)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    require_client_cert: bool = False
    server_name: str | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        assert self.cert is not None and self.key is not None, "no server certificate"
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca if self.require_client_cert else None,
            require_client_auth=self.require_client_cert)

    def channel(self) -> ChannelTls:
        """How this process dials the other slotmesh servers."""
        return ChannelTls(root_certificates=self.ca, certificate_chain=self.cert,
                          private_key=self.key, server_name=self.server_name)


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def env_flag(name: str, flag: str, environ=None) -> bool:
    """A boolean from the environment (1/true/yes/on, 0/false/no/off or unset)."""
    value = (os.environ if environ is None else environ).get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidRequestError(flag, f"${name} must be 1/true/yes/on or 0/false/no/off, "
                                    f"got {value!r}")


# -- gRPC TLS flags ------------------------------------------------------------------------

def add_tls_flags(p: argparse.ArgumentParser, *, server: bool) -> None:
    """--tls-* with $SLOTMESH_TLS_* defaults. server: also --tls-require-client-cert."""
    g = p.add_argument_group(
        "TLS", "Transport security of the gRPC calls (docs/security.md). Each flag "
               "defaults to the environment variable named in its help.")
    env = os.environ.get
    who = "this server's certificate chain (PEM); its calls to other slotmesh servers " \
          "present it as their client certificate" if server else \
          "client certificate chain (PEM) for servers that require one (mutual TLS)"
    g.add_argument("--tls-cert", type=Path, default=env("SLOTMESH_TLS_CERT") or None,
                   metavar="FILE", help=f"{who} (default: $SLOTMESH_TLS_CERT)")
    g.add_argument("--tls-key", type=Path, default=env("SLOTMESH_TLS_KEY") or None,
                   metavar="FILE", help="private key of --tls-cert (PEM) "
                                        "(default: $SLOTMESH_TLS_KEY)")
    g.add_argument("--tls-ca", type=Path, default=env("SLOTMESH_TLS_CA") or None,
                   metavar="FILE",
                   help="CA certificates (PEM) the servers this process dials must chain to"
                        + (", and with --tls-require-client-cert its clients' certificates"
                           if server else "; setting it turns TLS on")
                        + " (default: $SLOTMESH_TLS_CA; unset: the system's roots)")
    g.add_argument("--tls-server-name", default=env("SLOTMESH_TLS_SERVER_NAME") or None,
                   metavar="NAME",
                   help="name expected in the certificates of the servers this process "
                        "dials (default: $SLOTMESH_TLS_SERVER_NAME; unset: the host of "
                        "the address)")
    if server:
        g.add_argument("--tls-require-client-cert", action="store_true", default=None,
                       help="mutual TLS: refuse any client without a certificate that "
                            "chains to --tls-ca (default: $SLOTMESH_TLS_REQUIRE_CLIENT_CERT)")
    else:
        g.add_argument("--tls", action="store_true",
                       help="use TLS with the system's roots (implied by any other --tls-* "
                            "flag or $SLOTMESH_TLS_CA)")


def tls_config(args: argparse.Namespace, *, server: bool) -> TlsConfig | None:
    """The checked settings of add_tls_flags' flags; None = plaintext."""
    require = False
    if server:
        require = args.tls_require_client_cert or env_flag(
            "SLOTMESH_TLS_REQUIRE_CLIENT_CERT", "--tls-require-client-cert")
    if (args.tls_cert is None) != (args.tls_key is None):
        missing = "--tls-key" if args.tls_key is None else "--tls-cert"
        raise InvalidRequestError(missing, "--tls-cert and --tls-key go together")
    if require and args.tls_ca is None:
        raise InvalidRequestError("--tls-require-client-cert",
                                  "needs --tls-ca, the CA client certificates must chain to")
    wants_tls = (args.tls_cert or args.tls_ca or require or args.tls_server_name
                 or (not server and args.tls))
    if not wants_tls:
        return None
    if server and args.tls_cert is None:
        raise InvalidRequestError("--tls-cert", "a server with TLS settings needs its "
                                                "certificate (--tls-cert and --tls-key)")
    ca = _check_ca(args.tls_ca, "--tls-ca") if args.tls_ca else None
    cert = key = None
    if args.tls_cert is not None:
        cert, key = _check_pair(args.tls_cert, args.tls_key, "--tls-cert", "--tls-key")
    return TlsConfig(ca=ca, cert=cert, key=key, require_client_cert=require,
                     server_name=args.tls_server_name)


def _read_flag(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidRequestError(flag, f"cannot read {path}: {e.strerror}") from e


def _check_ca(path: Path, flag: str) -> bytes:
    data = _read_flag(path, flag)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise InvalidRequestError(flag, f"{path} holds no PEM certificate")
    try:
        ssl.create_default_context().load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, ValueError) as e:
        raise InvalidRequestError(flag, f"{path}: not valid PEM certificates ({e})") from e
    return data


def _check_pair(cert_path: Path, key_path: Path, cert_flag: str, key_flag: str
                ) -> tuple[bytes, bytes]:
    cert, key = _read_flag(cert_path, cert_flag), _read_flag(key_path, key_flag)
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise InvalidRequestError(cert_flag, f"{cert_path} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise InvalidRequestError(key_flag, f"{key_path} holds no PEM private key")
    if b"ENCRYPTED" in key:  # gRPC takes no passphrase
        raise InvalidRequestError(key_flag, f"{key_path} is encrypted; give the key "
                                            "without a passphrase (a mounted Secret)")
    try:  # a password callback: OpenSSL must never prompt on a terminal
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_path, key_path,
                                                                password=lambda: b"")
    except ssl.SSLError as e:
        raise InvalidRequestError(key_flag, f"{key_path} is not the key of {cert_path} "
                                            f"or not usable ({e.reason or e})") from e
    return cert, key


# -- Redis TLS -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class RedisTls:
    """TLS to Redis (a rediss:// URL): the CA file that the server's certificate must
    chain to (None: the system's roots) and an optional client certificate and key
    (redis-server's --tls-auth-clients). The hostname is checked against the
    certificate."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def connection_kwargs(self) -> dict:
        return {"ssl_ca_certs": self.ca_file, "ssl_certfile": self.cert_file,
                "ssl_keyfile": self.key_file, "ssl_cert_reqs": "required",
                "ssl_check_hostname": True}


def add_redis_tls_flags(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    g = p.add_argument_group(
        "Redis TLS", "With a rediss:// --redis-url. The password (or ACL user and "
                     "password) goes in the URL, best from $SLOTMESH_REDIS_URL so it stays "
                     "out of the command line; it is masked in every log and error.")
    g.add_argument("--redis-tls-ca", type=Path, default=env("SLOTMESH_REDIS_TLS_CA") or None,
                   metavar="FILE", help="CA certificates (PEM) Redis's certificate must "
                                        "chain to (default: $SLOTMESH_REDIS_TLS_CA; unset: "
                                        "the system's roots)")
    g.add_argument("--redis-tls-cert", type=Path,
                   default=env("SLOTMESH_REDIS_TLS_CERT") or None, metavar="FILE",
                   help="client certificate for a Redis with tls-auth-clients "
                        "(default: $SLOTMESH_REDIS_TLS_CERT)")
    g.add_argument("--redis-tls-key", type=Path,
                   default=env("SLOTMESH_REDIS_TLS_KEY") or None, metavar="FILE",
                   help="key of --redis-tls-cert (default: $SLOTMESH_REDIS_TLS_KEY)")


def redis_tls_config(args: argparse.Namespace) -> RedisTls | None:
    """The checked Redis TLS settings; None for a redis:// URL."""
    scheme = urllib.parse.urlsplit(args.redis_url).scheme
    if scheme not in ("redis", "rediss"):
        raise InvalidRequestError("--redis-url", f"must be redis:// or rediss://, not "
                                                 f"{scheme or 'no scheme'}")
    given = [f for f in ("redis_tls_ca", "redis_tls_cert", "redis_tls_key")
             if getattr(args, f) is not None]
    if scheme == "redis":
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise InvalidRequestError(flag, "needs a rediss:// --redis-url (TLS)")
        return None
    if (args.redis_tls_cert is None) != (args.redis_tls_key is None):
        missing = "--redis-tls-key" if args.redis_tls_key is None else "--redis-tls-cert"
        raise InvalidRequestError(missing, "--redis-tls-cert and --redis-tls-key go together")
    if args.redis_tls_ca is not None:
        _check_ca(args.redis_tls_ca, "--redis-tls-ca")
    if args.redis_tls_cert is not None:
        _check_pair(args.redis_tls_cert, args.redis_tls_key, "--redis-tls-cert",
                    "--redis-tls-key")

    def path(p: Path | None) -> str | None:
        return str(p.resolve()) if p is not None else None

    return RedisTls(ca_file=path(args.redis_tls_ca), cert_file=path(args.redis_tls_cert),
                    key_file=path(args.redis_tls_key))
