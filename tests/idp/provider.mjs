// A real OpenID provider for homescale's OIDC tests: npm's `oidc-provider` (the
// certified Node implementation) on loopback, plain http, with the test's clients
// and accounts.
//
//   node tests/idp/provider.mjs CONFIG.json
//
// CONFIG.json: {"port": 0, "host": "localhost", "clients": [{client_id, client_secret, redirect_uris}],
//   "accounts": {"<login>": {"sub": ..., "email": ..., "email_verified": ...,
//   "name": ..., "preferred_username": ..., "picture": ..., "groups": [...]}},
//   "pkce_required": false, "id_token_ttl": 3600}
// The accounts file is re-read on every login, so a test can change a user's
// groups or name between two logins.
//
// Its devInteractions serve the login and consent pages: any password is
// accepted; what is typed as the login is the account id, so type an account's
// "sub" (or a login without one); an unknown one fails the flow.
// On start it prints one line: `idp listening on http://127.0.0.1:PORT`.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';

import Provider from 'oidc-provider';

const configPath = process.argv[2];
const config = JSON.parse(readFileSync(configPath, 'utf8'));

function accounts() {
  return JSON.parse(readFileSync(configPath, 'utf8')).accounts || {};
}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', use: 'sig', alg: 'RS256' };

const server = createServer();
await new Promise((resolve) => { server.listen(config.port || 0, '127.0.0.1', resolve); });
// "host" names the issuer: "localhost" makes the provider another site than a
// homescale on 127.0.0.1, as a real provider is (cookies, SameSite).
const issuer = `http://${config.host || '127.0.0.1'}:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: config.clients.map((c) => ({
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...c,
  })),
  jwks: { keys: [jwk] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  scopes: ['openid', 'profile', 'email', 'groups', 'offline_access'],
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username', 'picture'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  features: { devInteractions: { enabled: true } },
  pkce: { required: () => Boolean(config.pkce_required) },
  ttl: { IdToken: config.id_token_ttl || 3600 },
  // The sign-in form gives the login; later look-ups (userinfo) give the subject.
  async findAccount(ctx, id) {
    const all = accounts();
    const login = id in all ? id : Object.keys(all).find((k) => all[k].sub === id);
    if (login === undefined) {
      return undefined;
    }
    const sub = all[login].sub || login;
    return {
      accountId: sub,
      async claims() {
        return { ...accounts()[login], sub };
      },
    };
  },
});
// Plain http on loopback: a lab setup, as homescale accepts for its issuer.
provider.proxy = false;
server.on('request', provider.callback());
for (const event of ['server_error', 'authorization.error', 'grant.error', 'userinfo.error']) {
  provider.on(event, (ctx, err) => { console.error(`${event}: ${err.stack || err}`); });
}

process.on('SIGTERM', () => { server.close(); process.exit(0); });
console.log(`idp listening on ${issuer}`);
