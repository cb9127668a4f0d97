"""TLS listeners: TLS 1.2 or newer, optionally with client certificates.

``ssl:`` strports descriptions are parsed here rather than by Twisted's own
parser, because that parser can express neither a client CA nor a fixed
minimum protocol version.  The result is a plain ``tcp:`` description and a
``CertificateOptions``; the caller wraps its factory in ``TLSMemoryBIOFactory``
and hands both to ``strports.service``, so a port that cannot be bound still
aborts startup loudly.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL.crypto import X509
from twisted.internet import ssl
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.filepath import FilePath

# Everything Twisted's ssl: parser accepts, except sslmethod: allowing a
# method would let a description lower the protocol floor.
_SSL_KEYWORDS = frozenset(
    {"port", "privateKey", "certKey", "interface", "backlog", "extraCertChain", "dhParameters"}
)
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


def split_description(description: str) -> tuple[str, list[str], dict[str, str]]:
    """Split a strports description into its prefix, positional and keyword
    arguments, honouring backslash escapes the way Twisted does."""
    fields: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    prefix, rest = fields[0], fields[1:]
    args = [field for field in rest if "=" not in field]
    kwargs = dict(field.split("=", 1) for field in rest if "=" in field)
    return prefix, args, kwargs


def is_tls_description(description: str) -> bool:
    """True for an ``ssl:`` strports description."""
    return split_description(description)[0].lower() == "ssl"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _load_certificates(path: str) -> list[X509]:
    """Every PEM certificate in ``path``, as pyOpenSSL objects."""
    pem = FilePath(path).getContent()
    return [X509.from_cryptography(c) for c in x509.load_pem_x509_certificates(pem)]


def parse_tls_description(
    description: str, client_ca: str | None = None
) -> tuple[str, ssl.CertificateOptions]:
    """Turn ``ssl:PORT:privateKey=...:certKey=...`` into a ``tcp:`` description
    and the TLS options to wrap it with.

    With ``client_ca`` (a PEM file of one or more CA certificates) every
    client must present a certificate signed by one of them.  Raises
    ``ValueError`` for an option Relay does not support.
    """
    prefix, args, kwargs = split_description(description)
    if prefix.lower() != "ssl":
        raise ValueError(f"not an ssl: description: {description!r}")
    unknown = set(kwargs) - _SSL_KEYWORDS
    if unknown:
        raise ValueError(
            f"unsupported ssl: option(s) {', '.join(sorted(unknown))}; "
            "Relay always negotiates TLS 1.2 or newer"
        )
    if args:
        kwargs.setdefault("port", args[0])
    if "port" not in kwargs:
        raise ValueError(f"no port in {description!r}")
    private_key = kwargs.get("privateKey", "server.pem")
    cert_key = kwargs.get("certKey", private_key)
    certificate = ssl.PrivateCertificate.loadPEM(
        FilePath(cert_key).getContent() + b"\n" + FilePath(private_key).getContent()
    )
    options: dict[str, Any] = {}
    if "extraCertChain" in kwargs:
        options["extraCertChain"] = _load_certificates(kwargs["extraCertChain"])
    if "dhParameters" in kwargs:
        options["dhParameters"] = ssl.DiffieHellmanParameters.fromFile(
            FilePath(kwargs["dhParameters"])
        )
    if client_ca is not None:
        options.update(
            verify=True, requireCertificate=True, caCerts=_load_certificates(client_ca)
        )
    context = ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        raiseMinimumTo=MINIMUM_TLS_VERSION,
        **options,
    )
    tcp = f"tcp:{kwargs['port']}"
    for keyword in ("interface", "backlog"):
        if keyword in kwargs:
            tcp += f":{keyword}={_escape(kwargs[keyword])}"
    return tcp, context


def listener(
    description: str, factory: IProtocolFactory, client_ca: str | None = None
) -> tuple[str, IProtocolFactory]:
    """The strports description and factory to listen with.

    ``ssl:`` descriptions become TCP listeners whose factory is wrapped in
    TLS; anything else is returned unchanged.
    """
    if not is_tls_description(description):
        return description, factory
    tcp, context = parse_tls_description(description, client_ca)
    return tcp, TLSMemoryBIOFactory(context, False, factory)


def certificate_user_id(certificate: Any) -> str | None:
    """The common name of a peer certificate (pyOpenSSL X509), or None."""
    if certificate is None:
        return None
    subject = certificate.to_cryptography().subject
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) and value else None
