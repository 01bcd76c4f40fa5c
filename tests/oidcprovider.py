"""A real OpenID provider for tests: npm's oidc-provider, run by node on loopback.

`TestIdP` starts tests/idp/provider.mjs with the test's client and accounts (a
JSON file the provider re-reads at each login, so a test can change a user's
groups between logins); `sign_in` plays the browser through its login and
consent pages with an HTTP client, following every redirect, and returns the
page homescale shows at the end. Tier idp (tests/tiers.py): missing node or an
uninstalled tests/idp/node_modules skip the tests with the reason (CI fails).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests import tiers

IDP_DIR = Path(__file__).resolve().parent / "idp"
PROVIDER = IDP_DIR / "provider.mjs"
CLIENT_ID = "homescale-test"
CLIENT_SECRET = "test-client-secret-1234567890"
MAX_HOPS = 20


def require_idp() -> None:
    """Skip (or fail in CI) unless node and the installed oidc-provider are here."""
    node = shutil.which("node")
    tiers.require_tier("idp", node is not None, "node missing (apt-get install nodejs npm)")
    tiers.require_tier(
        "idp",
        (IDP_DIR / "node_modules" / "oidc-provider").is_dir(),
        "oidc-provider not installed: run tests/idp/setup.sh (make test does)",
    )


@dataclass
class TestIdP:
    """A running provider; ``issuer`` is its http://127.0.0.1:PORT URL."""

    __test__ = False  # not a test class, despite the name

    directory: Path
    redirect_uri: str
    accounts: dict[str, dict[str, Any]]
    pkce_required: bool = True
    id_token_ttl: int = 3600  # seconds
    host: str = "localhost"  # another site than homescale's 127.0.0.1, as in real life
    issuer: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = self.directory / "idp.log"
        self.config_path = self.directory / "idp.json"

    def write_config(self) -> None:
        self.config_path.write_text(
            json.dumps(
                {
                    "port": 0,
                    "host": self.host,
                    "clients": [
                        {
                            "client_id": CLIENT_ID,
                            "client_secret": CLIENT_SECRET,
                            "redirect_uris": [self.redirect_uri],
                        }
                    ],
                    "accounts": self.accounts,
                    "pkce_required": self.pkce_required,
                    "id_token_ttl": self.id_token_ttl,
                }
            )
        )

    def set_account(self, login: str, claims: dict[str, Any]) -> None:
        """Change (or add) an account; the provider reads it at the next login."""
        self.accounts[login] = claims
        self.write_config()

    def start(self, timeout: float = 15.0, attempts: int = 2) -> None:
        """Start the provider and wait for its listening line. It starts in about half a
        second, but in two of about a dozen full runs of the suite one start printed node's
        version warning and then nothing for 20 s. A start that hangs is stopped and made
        once more (starting the provider is not what any test checks); the failure names
        every attempt."""
        states = []
        for _ in range(attempts):
            state = self._start_once(timeout)
            if state is None:
                return
            states.append(state)
            self.stop()
        pytest.fail(
            f"the test OpenID provider did not start ({'; '.join(states)}); log:\n"
            f"{self.log_path.read_text()}"
        )

    def _start_once(self, timeout: float) -> str | None:
        """None once the provider listens; otherwise what went wrong."""
        self.write_config()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                ["node", str(PROVIDER), str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=IDP_DIR,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"idp listening on (http://\S+)", self.log_path.read_text())
            if m:
                self.issuer = m.group(1)
                return None
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        code = self.proc.poll()
        return f"exited with {code}" if code is not None else f"still starting after {timeout:g} s"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class SignIn:
    """How a browser's sign-in ended: the last page and every URL it went through."""

    final: httpx.Response
    urls: list[str]

    @property
    def text(self) -> str:
        return self.final.text


def require_browser() -> str:
    """The system chromium driven by playwright (tier browser); never a downloaded one."""
    path = shutil.which("chromium")
    tiers.require_tier("browser", path is not None, "chromium missing (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        tiers.require_tier("browser", False, "playwright missing (pip install -e '.[test]')")
    assert path is not None
    return path


def browser_sign_in(chromium: str, auth_url: str, login: str, *, idp: TestIdP) -> tuple[str, str]:
    """Open ``auth_url`` in headless chromium and sign in as a person would: type the
    login and a password, press Sign-in, Continue on the consent page, then "Connect
    this machine" on homescale's confirmation. Returns the final page's URL and text."""
    from playwright.sync_api import sync_playwright

    sub = idp.accounts.get(login, {}).get("sub", login)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(auth_url)
            page.fill('input[name="login"]', sub)
            page.fill('input[name="password"]', "any password")
            page.click('button[type="submit"]')
            page.wait_for_selector('button[type="submit"]:has-text("Continue")')
            page.click('button[type="submit"]')
            page.wait_for_url(lambda u: "/oidc/callback" in u)
            page.click("#confirm")  # "Connect this machine" on homescale's page
            page.wait_for_url(lambda u: "/register/confirm/" in u)
            page.wait_for_load_state()
            return page.url, page.inner_text("body")
        finally:
            browser.close()


def _form_action(page: str, base: str) -> str:
    m = re.search(r"""<form[^>]*action=["']([^"']+)["']""", page)
    assert m, f"no form on the provider's page:\n{page[:2000]}"
    return urljoin(base, m.group(1).replace("&amp;", "&"))


def sign_in(
    auth_url: str,
    login: str,
    *,
    idp: TestIdP,
    client: httpx.Client | None = None,
    stop_at_callback: bool = False,
    confirm: bool = True,
) -> SignIn:
    """Open ``auth_url`` and sign in at the provider as ``login`` (any password), then
    press "Connect this machine" on homescale's confirmation page (unless ``confirm``
    is false: then ``final`` is that page).

    With ``stop_at_callback`` the redirect back to homescale is not followed: the
    result's ``final`` is the provider's redirect, whose Location a test can replay
    or tamper with.
    """
    own = client is None
    c = client or httpx.Client(timeout=15)
    urls: list[str] = []
    try:
        r = c.get(auth_url)
        for _ in range(MAX_HOPS):
            urls.append(str(r.url))
            if r.is_redirect:
                nxt = urljoin(str(r.url), r.headers["location"])
                if stop_at_callback and urlsplit(nxt).path == "/oidc/callback":
                    return SignIn(r, urls)
                r = c.get(nxt)
                continue
            at_idp = str(r.url).startswith(idp.issuer)
            if at_idp and "/interaction/" in str(r.url) and r.status_code == 200:
                action = _form_action(r.text, str(r.url))
                if 'name="login"' in r.text:
                    # devInteractions take what is typed as the account id: the subject.
                    sub = idp.accounts.get(login, {}).get("sub", login)
                    form = {"prompt": "login", "login": sub, "password": "any"}
                else:
                    form = {"prompt": "consent"}
                r = c.post(action, data=form)
                continue
            if confirm and not at_idp and "/register/confirm/" in r.text:
                action = _form_action(r.text, str(r.url))
                csrf = re.search(r"name='csrf' value='([^']+)'", r.text)
                assert csrf, r.text
                r = c.post(action, data={"csrf": csrf.group(1)})
                continue
            return SignIn(r, urls)
        pytest.fail(f"sign-in did not finish within {MAX_HOPS} hops: {urls}")
    finally:
        if own:
            c.close()
