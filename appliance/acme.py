"""Let's Encrypt built in: headscale's `tls_letsencrypt_*` and `acme_*` keys.

The certificate for `tls_letsencrypt_hostname` is obtained at first start, kept in
`tls_letsencrypt_cache_dir`, served on the main listener (so also to DERP clients),
and renewed 30 days before it expires without a restart: the new chain is loaded
into the same SSLContext, which every new handshake uses.

The ACME protocol is certbot's `acme` library (the maintained Python client; it
is synchronous, so each order runs in a worker thread under a deadline). This
process answers the challenges itself: HTTP-01 on `tls_letsencrypt_listen` (port
80 by default; every other request there is redirected to https, as headscale's
autocert handler does), TLS-ALPN-01 on the main listener (RFC 8737: a
self-signed certificate carrying the key authorization's digest, chosen by SNI
while the challenge is open and offered only with the `acme-tls/1` protocol).
The ACME server's own certificate is checked against the system's CAs, or the
bundle REQUESTS_CA_BUNDLE names.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .config import AcmeSettings
from .errors import HomescaleError
from .httpserver import HttpServer, Request, Response
from .version import version

# Go's autocert (what headscale uses) renews 30 days before expiry; Let's Encrypt's
# certificates live 90 days, so there is time for many retries.
RENEW_BEFORE = dt.timedelta(days=30)
# After a failed order: first retry soon, then back off to an hour (Let's Encrypt
# allows 5 failed validations per hostname and hour).
RETRY_FIRST, RETRY_MAX = 60.0, 3600.0
ORDER_TIMEOUT = 120.0  # seconds for one whole order (directory .. certificate)
MAX_SLEEP = 12 * 3600.0  # look at the clock at least twice a day (suspend, clock jumps)
# RFC 8737: the acmeIdentifier extension and the ALPN protocol of TLS-ALPN-01.
ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
ACME_TLS_ALPN = "acme-tls/1"


class AcmeError(HomescaleError):
    """An ACME order failed; the message names the step and the server's answer."""


def listen_address(spec: str) -> tuple[str, int]:
    """headscale's `tls_letsencrypt_listen` (`:http`, `:80`, `0.0.0.0:80`) -> (host, port)."""
    host, sep, port = spec.rpartition(":")
    if not sep:
        raise ValueError(f"expected [host]:port like :http or 0.0.0.0:80, got {spec!r}")
    # Known without /etc/services (absent on minimal systems; Go's net has the same table).
    named = {"http": 80, "https": 443}
    try:
        number = int(port) if port.isdigit() else named.get(port) or socket.getservbyname(port)
    except OSError:
        raise ValueError(f"unknown port {port!r} (use a number, or http)") from None
    return host.strip("[]") or "0.0.0.0", number


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically, readable by the owner only (keys)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _new_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key, pem


def _self_signed(
    hostname: str,
    key: ec.EllipticCurvePrivateKey,
    lifetime: dt.timedelta,
    *,
    acme_digest: bytes = b"",
) -> bytes:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
    )
    if acme_digest:
        # The extension's value is the DER OCTET STRING of SHA-256(key authorization).
        der = b"\x04\x20" + acme_digest
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER, der), critical=True
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class CertManager:
    """Keeps a Let's Encrypt certificate in `context`: obtains, caches and renews it."""

    def __init__(
        self,
        settings: AcmeSettings,
        log: logging.Logger,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.log = log
        self.clock = clock
        self.dir = settings.cache_dir
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise AcmeError(f"tls_letsencrypt_cache_dir: cannot create {self.dir}: {e}") from None
        host = settings.hostname
        self.cert_path = self.dir / f"{host}.crt"
        self.key_path = self.dir / f"{host}.key"
        self.account_path = self.dir / "acme_account.key"
        self._wake = trio.Event()
        self._http01: dict[str, str] = {}  # token -> key authorization
        self._alpn: dict[str, ssl.SSLContext] = {}  # hostname -> challenge context
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.set_alpn_protocols(["http/1.1"])
        self.context.sni_callback = self._sni
        if self.not_after() is not None:
            self._load()
        else:
            # Until the first certificate arrives: a stand-in, so the listener can start
            # (TLS-ALPN-01 is answered on it).
            key, key_pem = _new_key()
            self._load_pair(_self_signed(host, key, dt.timedelta(days=1)), key_pem)

    # ------------------------------------------------------------ the certificate

    def not_after(self) -> dt.datetime | None:
        """When the cached certificate expires (None: there is none, or it is unreadable)."""
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError):
            return None
        if not self.key_path.exists():
            return None
        return cert.not_valid_after_utc

    def renew_at(self) -> float:
        end = self.not_after()
        return 0.0 if end is None else (end - RENEW_BEFORE).timestamp()

    def _load(self) -> None:
        try:
            self.context.load_cert_chain(str(self.cert_path), str(self.key_path))
        except (OSError, ssl.SSLError) as e:
            raise AcmeError(f"{self.cert_path}: cannot load the cached certificate: {e}") from None

    def _load_pair(
        self, cert_pem: bytes, key_pem: bytes, ctx: ssl.SSLContext | None = None
    ) -> None:
        """Load PEM material into a context (the ssl module only loads from files)."""
        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            c, k = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
            c.write_bytes(cert_pem)
            _write_private(k, key_pem)
            (ctx or self.context).load_cert_chain(str(c), str(k))

    def _sni(self, conn: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        challenge = self._alpn.get(server_name or "")
        if challenge is not None:
            conn.context = challenge

    # ------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the HTTP-01 responder (if used), get the certificate, renew it forever.

        Started once the first attempt is over; a failure is logged and retried with
        backoff (the stand-in certificate is served meanwhile)."""
        async with trio.open_nursery() as nursery:
            if self.settings.challenge_type == "HTTP-01":
                host, port = listen_address(self.settings.listen)
                try:
                    listeners = await trio.open_tcp_listeners(port, host=host)
                except OSError as e:
                    raise AcmeError(
                        f"tls_letsencrypt_listen: cannot listen on {self.settings.listen}: "
                        f"{e.strerror}"
                    ) from None
                http = HttpServer(
                    routes={
                        "/.well-known/acme-challenge/": self._http01_route,
                        "/": self._redirect_route,
                    },
                    upgrades={},
                    logger=self.log.getChild("http01"),
                )
                await nursery.start(http.serve, listeners)
            retry = RETRY_FIRST
            started = False
            while True:
                wait = self.renew_at() - self.clock()
                if wait <= 0:
                    try:
                        await self.obtain()
                        retry = RETRY_FIRST
                    except AcmeError as e:
                        self.log.error("%s; retrying in %d s", e, retry)
                        wait, retry = retry, min(retry * 2, RETRY_MAX)
                    else:
                        continue
                if not started:
                    task_status.started()
                    started = True
                with trio.move_on_after(min(wait, MAX_SLEEP)):
                    await self._wake.wait()
                self._wake = trio.Event()

    def recheck(self) -> None:
        """Look at the certificate's expiry now (not at the next timer)."""
        self._wake.set()

    async def obtain(self) -> None:
        """One order, in a worker thread under a deadline; then serve the new chain."""
        try:
            with trio.fail_after(ORDER_TIMEOUT + 10):
                await trio.to_thread.run_sync(self._order, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise AcmeError(
                f"ACME order for {self.settings.hostname} took longer than {ORDER_TIMEOUT:.0f} s"
            ) from None
        finally:
            self._http01.clear()
            self._alpn.clear()
        self._load()
        self.log.info(
            "certificate for %s obtained from %s, valid until %s",
            self.settings.hostname,
            self.settings.directory_url,
            self.not_after(),
        )

    # ------------------------------------------------------------ challenges

    async def _http01_route(self, req: Request) -> Response:
        token = req.path.rsplit("/", 1)[-1]
        answer = self._http01.get(token)
        if answer is None:
            return Response.text("no such challenge\n", 404)
        return Response.text(answer, content_type="application/octet-stream")

    async def _redirect_route(self, req: Request) -> Response:
        location = f"https://{self.settings.hostname}{req.target}"
        return Response(308, b"", [("Location", location)])

    def _alpn_context(self, key_authorization: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.set_alpn_protocols([ACME_TLS_ALPN])
        key, key_pem = _new_key()
        digest = hashlib.sha256(key_authorization.encode()).digest()
        cert = _self_signed(self.settings.hostname, key, dt.timedelta(days=1), acme_digest=digest)
        self._load_pair(cert, key_pem, ctx)
        return ctx

    # ------------------------------------------------------------ the ACME order (thread)

    def _account_key(self) -> Any:
        from josepy.jwk import JWKEC

        try:
            pem = self.account_path.read_bytes()
        except FileNotFoundError:
            _, pem = _new_key()
            _write_private(self.account_path, pem)
        key = serialization.load_pem_private_key(pem, password=None)
        return JWKEC(key=key)

    def _order(self) -> None:
        from acme import client, crypto_util, errors, messages
        from josepy.b64 import b64encode
        from josepy.jwa import ES256

        s = self.settings
        account_key = self._account_key()
        net = client.ClientNetwork(
            account_key, alg=ES256, user_agent=f"homescale/{version()}", timeout=30
        )
        step = "directory"
        try:
            directory = client.ClientV2.get_directory(s.directory_url, net)
            acme = client.ClientV2(directory, net=net)
            step = "account"
            new = messages.NewRegistration.from_data(
                email=s.email or None, terms_of_service_agreed=True
            )
            try:
                net.account = acme.new_account(new)
            except errors.ConflictError as e:  # this key has an account already
                net.account = acme.query_registration(
                    messages.RegistrationResource(uri=e.location, body=messages.Registration())
                )
            step = "order"
            _key, key_pem = _new_key()
            order = acme.new_order(crypto_util.make_csr(key_pem, [s.hostname]))
            wanted = s.challenge_type.lower()
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue
                challb = next((c for c in authz.body.challenges if _typ(c) == wanted), None)
                if challb is None:
                    offered = ", ".join(_typ(c) for c in authz.body.challenges)
                    raise AcmeError(
                        f"the ACME server offers no {s.challenge_type} challenge for "
                        f"{s.hostname} (it offers {offered}); set "
                        f"tls_letsencrypt_challenge_type to one of them"
                    )
                step = f"{s.challenge_type} challenge"
                if wanted == "http-01":
                    response, validation = challb.chall.response_and_validation(account_key)
                    self._http01[challb.chall.encode("token")] = validation
                else:
                    # acme 5 dropped its TLS-ALPN-01 helpers; the key authorization is
                    # RFC 8555's token "." base64url(JWK thumbprint).
                    token = challb.chall.jobj["token"]
                    thumb = b64encode(account_key.thumbprint()).decode()
                    key_authorization = f"{token}.{thumb}"
                    self._alpn[s.hostname] = self._alpn_context(key_authorization)
                    response = _TlsAlpn01Response(key_authorization)
                # Posted directly: ClientV2.answer_challenge insists on a Link "up" header
                # that RFC 8555 does not require (pebble sends none for tls-alpn-01).
                net.post(challb.uri, response, new_nonce_url=directory["newNonce"])
            step = "finalize"
            deadline = dt.datetime.now() + dt.timedelta(seconds=ORDER_TIMEOUT)
            done = acme.poll_and_finalize(order, deadline)
        except AcmeError:
            raise
        except errors.ValidationError as e:
            detail = "; ".join(
                str(c.error) for a in e.failed_authzrs for c in a.body.challenges if c.error
            )
            raise AcmeError(f"ACME {step} for {s.hostname}: validation failed: {detail}") from None
        except (errors.Error, messages.Error, OSError, ValueError) as e:
            raise AcmeError(f"ACME {step} for {s.hostname} at {s.directory_url}: {e}") from None
        _write_private(self.key_path, key_pem)
        tmp = self.cert_path.with_name(self.cert_path.name + ".tmp")
        tmp.write_text(done.fullchain_pem)
        os.replace(tmp, self.cert_path)


def _typ(challb: Any) -> str:
    """A challenge's type; those `acme` does not model (tls-alpn-01) keep it in their JSON."""
    typ = challb.chall.typ
    return typ if isinstance(typ, str) else str(challb.chall.jobj.get("type", ""))


def _tls_alpn01_response_type() -> Any:
    from acme import challenges

    @challenges.ChallengeResponse.register
    class TlsAlpn01Response(challenges.KeyAuthorizationChallengeResponse):
        """RFC 8737's response: an empty object on the wire (the proof is the handshake).
        With no field set, josepy's object is falsy and `acme` would send an empty
        payload (a POST-as-GET, which starts no validation): keep the key authorization."""

        typ = "tls-alpn-01"

    return TlsAlpn01Response


class _LazyResponse:
    """Built on first use: importing `acme` costs time every other start does not need."""

    _cls: Any = None

    def __call__(self, key_authorization: str) -> Any:
        if self._cls is None:
            self._cls = _tls_alpn01_response_type()
        return self._cls(key_authorization=key_authorization)


_TlsAlpn01Response = _LazyResponse()
