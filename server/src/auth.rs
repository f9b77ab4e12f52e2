//! Who may use which space: static bearer tokens from `auth.toml`, and
//! HS256 JWTs signed with a configured secret (so an app's backend can mint
//! device tokens).

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

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

#[derive(Deserialize)]
struct AuthFile {
    jwt_secret: Option<String>,
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
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

#[derive(Default)]
pub struct Auth {
    tokens: HashMap<String, Grant>,
    jwt: Option<DecodingKey>,
    dev: bool,
}

impl Auth {
    pub fn from_toml(text: &str) -> anyhow::Result<Auth> {
        let file: AuthFile = toml::from_str(text)?;
        let mut auth = Auth::default();
        for t in file.tokens {
            anyhow::ensure!(
                t.token.len() >= 8,
                "token for {} is shorter than 8 characters",
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
        if let Some(secret) = file.jwt_secret {
            anyhow::ensure!(secret.len() >= 32, "jwt_secret must be at least 32 bytes");
            auth.jwt = Some(DecodingKey::from_secret(secret.as_bytes()));
        }
        Ok(auth)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Auth> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::from_toml(&text)
    }

    /// Also accept `DEV_TOKEN` for every space, read-write.
    pub fn with_dev_token(mut self) -> Auth {
        self.dev = true;
        self
    }

    /// Checks an `Authorization` header for `space`, and for writing.
    pub fn check(&self, header: Option<&str>, space: &str, write: bool) -> Result<Grant, Denied> {
        let token = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Denied::Unauthenticated("missing bearer token".into()))?;
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
        if let Some(key) = &self.jwt {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.set_required_spec_claims(&["exp"]);
            return match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => Ok(Grant {
                    user: data.claims.user,
                    spaces: data.claims.spaces,
                    mode: data.claims.mode,
                }),
                Err(e) => Err(Denied::Unauthenticated(format!("invalid token: {e}"))),
            };
        }
        Err(Denied::Unauthenticated("unknown token".into()))
    }
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
