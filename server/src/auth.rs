//! Who may use which space: static bearer tokens from `auth.toml`, and
//! HS256 JWTs signed with a configured secret (so an app's backend can mint
//! device tokens).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::quota::Quotas;

/// The fixed token `--dev` accepts (loopback only).
pub const DEV_TOKEN: &str = "dev-token";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Mode {
    #[serde(rename = "read")]
    Read,
    #[serde(rename = "read-write")]
    ReadWrite,
}

/// What one token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub user: String,
    /// Space names; `*` means every space.
    pub spaces: Vec<String>,
    pub mode: Mode,
}

impl Grant {
    fn allows(&self, space: &str) -> bool {
        self.spaces.iter().any(|s| s == "*" || s == space)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one we do not accept: 401.
    Unauthenticated(String),
    /// A valid token without the right to this space or to write: 403.
    Forbidden(String),
}

/// How far (seconds) a JWT's `exp` and `nbf` may be off, for the clocks
/// of the server and of the backend that minted it (PROTOCOL.md, Tokens).
pub const JWT_LEEWAY_SECS: u64 = 60;

/// `auth.toml`. Unknown keys are refused: a misspelt `jwt_secret` would
/// otherwise leave a server that accepts no JWT, without a word.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    jwt_secret: Option<String>,
    /// The `iss` every JWT must carry, when set.
    jwt_issuer: Option<String>,
    /// The `aud` every JWT must carry, when set.
    jwt_audience: Option<String>,
    /// Whether a JWT may claim every space with `"*"`: off, so that a leaked
    /// signing secret or a backend bug cannot mint a key to everything
    /// unless the operator chose that.
    #[serde(default)]
    jwt_allow_wildcard: bool,
    #[serde(default)]
    tokens: Vec<TokenEntry>,
    /// Per-user limits (see `quota::Quotas`).
    #[serde(default)]
    quotas: Quotas,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token: String,
    user: String,
    spaces: Vec<String>,
    mode: Mode,
}

#[derive(Deserialize)]
struct Claims {
    user: String,
    spaces: Vec<String>,
    mode: Mode,
}

/// How JWTs are checked.
struct Jwt {
    key: DecodingKey,
    validation: Validation,
    allow_wildcard: bool,
}

#[derive(Default)]
pub struct Auth {
    tokens: HashMap<String, Grant>,
    jwt: Option<Jwt>,
    dev: bool,
    /// The `[quotas]` of the auth file.
    pub quotas: Quotas,
}

/// What a client is told about a token it may not use: enough to act on
/// (get a new token), nothing about which check failed.
const NOT_VALID: &str = "the token is not valid";

impl Auth {
    pub fn from_toml(text: &str) -> anyhow::Result<Auth> {
        let file: AuthFile = toml::from_str(text)?;
        let mut auth = Auth {
            quotas: file.quotas.clone(),
            ..Auth::default()
        };
        for t in file.tokens {
            anyhow::ensure!(
                t.token.len() >= 8,
                "token for {} is shorter than 8 characters",
                t.user
            );
            anyhow::ensure!(!t.spaces.is_empty(), "token for {} grants no space", t.user);
            anyhow::ensure!(
                !auth.tokens.contains_key(&t.token),
                "token for {} is the token of an earlier [[tokens]] entry",
                t.user
            );
            auth.tokens.insert(
                t.token,
                Grant {
                    user: t.user,
                    spaces: t.spaces,
                    mode: t.mode,
                },
            );
        }
        match file.jwt_secret {
            Some(secret) => {
                anyhow::ensure!(secret.len() >= 32, "jwt_secret must be at least 32 bytes");
                let mut validation = Validation::new(Algorithm::HS256);
                validation.leeway = JWT_LEEWAY_SECS;
                validation.validate_nbf = true;
                let mut required = vec!["exp"];
                if let Some(iss) = &file.jwt_issuer {
                    validation.set_issuer(&[iss]);
                    required.push("iss");
                }
                if let Some(aud) = &file.jwt_audience {
                    validation.set_audience(&[aud]);
                    required.push("aud");
                }
                validation.set_required_spec_claims(&required);
                auth.jwt = Some(Jwt {
                    key: DecodingKey::from_secret(secret.as_bytes()),
                    validation,
                    allow_wildcard: file.jwt_allow_wildcard,
                });
            }
            None => {
                let jwt_only = [
                    ("jwt_issuer", file.jwt_issuer.is_some()),
                    ("jwt_audience", file.jwt_audience.is_some()),
                    ("jwt_allow_wildcard", file.jwt_allow_wildcard),
                ];
                if let Some((key, _)) = jwt_only.iter().find(|(_, set)| *set) {
                    anyhow::bail!("{key} is set but jwt_secret is not: no JWT is accepted");
                }
            }
        }
        anyhow::ensure!(
            !auth.tokens.is_empty() || auth.jwt.is_some(),
            "it grants nothing: give [[tokens]] or a jwt_secret"
        );
        Ok(auth)
    }

    /// Reads `auth.toml`; an error names the file and the problem.
    pub fn from_file(path: &Path) -> anyhow::Result<Auth> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the auth file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("the auth file {}", path.display()))
    }

    /// Also accept `DEV_TOKEN` for every space, read-write.
    pub fn with_dev_token(mut self) -> Auth {
        self.dev = true;
        self
    }

    /// Checks an `Authorization` header for `space`, and for writing.
    pub fn check(&self, header: Option<&str>, space: &str, write: bool) -> Result<Grant, Denied> {
        let token =
            bearer(header).ok_or_else(|| Denied::Unauthenticated("missing bearer token".into()))?;
        let grant = self.grant(token)?;
        if !grant.allows(space) {
            return Err(Denied::Forbidden(format!(
                "{} may not use space {space:?}",
                grant.user
            )));
        }
        if write && grant.mode != Mode::ReadWrite {
            return Err(Denied::Forbidden(format!(
                "{} may only read space {space:?}",
                grant.user
            )));
        }
        Ok(grant)
    }

    fn grant(&self, token: &str) -> Result<Grant, Denied> {
        if self.dev && token == DEV_TOKEN {
            return Ok(Grant {
                user: "dev".into(),
                spaces: vec!["*".into()],
                mode: Mode::ReadWrite,
            });
        }
        if let Some(g) = self.tokens.get(token) {
            return Ok(g.clone());
        }
        let Some(jwt) = &self.jwt else {
            return Err(Denied::Unauthenticated(NOT_VALID.into()));
        };
        let claims = match jsonwebtoken::decode::<Claims>(token, &jwt.key, &jwt.validation) {
            Ok(data) => data.claims,
            Err(e) => {
                // The operator sees which check failed; the client only
                // what it can act on.
                tracing::info!(reason = ?e.kind(), "JWT refused");
                let message = match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::ImmatureSignature => "the token is not valid yet",
                    _ => NOT_VALID,
                };
                return Err(Denied::Unauthenticated(message.into()));
            }
        };
        if !jwt.allow_wildcard && claims.spaces.iter().any(|s| s == "*") {
            tracing::info!(
                user = claims.user,
                "JWT refused: it claims every space (\"*\") and jwt_allow_wildcard is off"
            );
            return Err(Denied::Unauthenticated(NOT_VALID.into()));
        }
        Ok(Grant {
            user: claims.user,
            spaces: claims.spaces,
            mode: claims.mode,
        })
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is
/// matched without regard to case (RFC 7235).
fn bearer(header: Option<&str>) -> Option<&str> {
    let (scheme, token) = header?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const CONFIG: &str = r#"
        jwt_secret = "0123456789abcdef0123456789abcdef"
        [[tokens]]
        token = "alice-secret-token"
        user = "alice"
        spaces = ["alice-lists"]
        mode = "read-write"
        [[tokens]]
        token = "viewer-secret-token"
        user = "viewer"
        spaces = ["alice-lists"]
        mode = "read"
    "#;

    fn jwt(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap()
    }

    #[test]
    fn static_tokens_grant_their_spaces_and_modes() {
        let auth = Auth::from_toml(CONFIG).unwrap();
        assert!(auth
            .check(Some("Bearer alice-secret-token"), "alice-lists", true)
            .is_ok());
        assert!(matches!(
            auth.check(None, "alice-lists", false),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.check(Some("Bearer nope-nope-nope"), "alice-lists", false),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.check(Some("Bearer alice-secret-token"), "bob", false),
            Err(Denied::Forbidden(_))
        ));
        assert!(auth
            .check(Some("Bearer viewer-secret-token"), "alice-lists", false)
            .is_ok());
        assert!(matches!(
            auth.check(Some("Bearer viewer-secret-token"), "alice-lists", true),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            auth.check(Some(DEV_TOKEN), "x", false),
            Err(Denied::Unauthenticated(_))
        ));
    }

    #[test]
    fn jwts_signed_with_the_secret_are_accepted_until_they_expire() {
        let auth = Auth::from_toml(CONFIG).unwrap();
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let good = jwt(
            serde_json::json!({"user": "bob", "spaces": ["team"], "mode": "read-write", "exp": exp}),
        );
        let grant = auth
            .check(Some(&format!("Bearer {good}")), "team", true)
            .unwrap();
        assert_eq!(grant.user, "bob");
        let expired = jwt(
            serde_json::json!({"user": "bob", "spaces": ["team"], "mode": "read-write", "exp": 1000}),
        );
        assert!(matches!(
            auth.check(Some(&format!("Bearer {expired}")), "team", false),
            Err(Denied::Unauthenticated(_))
        ));
        let forged = good.replace('.', ".x");
        assert!(matches!(
            auth.check(Some(&format!("Bearer {forged}")), "team", false),
            Err(Denied::Unauthenticated(_))
        ));
    }

    #[test]
    fn the_dev_token_only_works_when_enabled() {
        let auth = Auth::default().with_dev_token();
        assert!(auth
            .check(Some("Bearer dev-token"), "anything", true)
            .is_ok());
        assert!(Auth::from_toml(
            "[[tokens]]\ntoken = \"short\"\nuser = \"u\"\nspaces = []\nmode = \"read\""
        )
        .is_err());
    }
}
