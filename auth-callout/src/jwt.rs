//! The NATS JWTs of the auth callout exchange (nats-io/jwt v2): the
//! server's authorization request (verified here), and the callout's
//! response and user claims (signed here with the issuer account key).
//! `header.claims.signature`, base64url without padding, ed25519 over the
//! first two parts.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::CalloutError;
use crate::nkey::{AccountKey, Kind, PublicKey};

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;
/// The audience the server puts on its requests.
pub const REQUEST_AUDIENCE: &str = "nats-authorization-request";

/// Sign `claims` as `issuer`: sets `iss`, `iat` and `jti` (a hash of the
/// claims, as nats-io/jwt does).
pub fn encode(mut claims: Value, issuer: &AccountKey, now: i64) -> String {
    claims["iss"] = json!(issuer.public_key().to_string());
    claims["iat"] = json!(now);
    claims["jti"] = json!("");
    let digest = ring::digest::digest(&ring::digest::SHA512_256, claims.to_string().as_bytes());
    claims["jti"] = json!(data_encoding::BASE32_NOPAD.encode(digest.as_ref()));
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = URL_SAFE_NO_PAD.encode(issuer.sign(signed.as_bytes()));
    format!("{signed}.{signature}")
}

/// Decode `token`, checking its header, that `iss` is a key of `kind` and
/// that the signature is that key's. Returns the claims.
pub fn decode_verified(token: &str, kind: Kind) -> Result<Value, CalloutError> {
    let invalid = |why: String| CalloutError::Request(why);
    let mut parts = token.trim().split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("not a JWT (three dot-separated parts)".into()));
    };
    let part = |p: &str, name: &str| {
        URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| invalid(format!("JWT {name} is not base64url")))
    };
    let parsed_header: Value = serde_json::from_slice(&part(header, "header")?)
        .map_err(|e| invalid(format!("JWT header is not JSON: {e}")))?;
    if !parsed_header["typ"]
        .as_str()
        .is_some_and(|t| t.eq_ignore_ascii_case("jwt"))
        || parsed_header["alg"].as_str() != Some("ed25519-nkey")
    {
        return Err(invalid(format!(
            "JWT header {parsed_header} is not a NATS JWT's"
        )));
    }
    let claims_json: Value = serde_json::from_slice(&part(claims, "claims")?)
        .map_err(|e| invalid(format!("JWT claims are not JSON: {e}")))?;
    let issuer = claims_json["iss"]
        .as_str()
        .ok_or_else(|| invalid("JWT has no issuer".into()))
        .and_then(|iss| PublicKey::parse(iss).map_err(|e| invalid(e.to_string())))?;
    if issuer.kind != kind {
        return Err(invalid(format!(
            "JWT issuer {issuer} is a {:?} key, expected {kind:?}",
            issuer.kind
        )));
    }
    let signed = &token.trim()[..header.len() + 1 + claims.len()];
    if !issuer.verifies(signed.as_bytes(), &part(signature, "signature")?) {
        return Err(invalid("JWT signature does not verify".into()));
    }
    Ok(claims_json)
}

/// What the server asks: who connected, with what.
#[derive(Debug, Deserialize)]
pub struct AuthorizationRequest {
    pub server_id: ServerId,
    /// The nkey the server made for this connection; the grant is for it.
    pub user_nkey: String,
    #[serde(default)]
    pub client_info: ClientInfo,
    #[serde(default)]
    pub connect_opts: ConnectOpts,
}

#[derive(Debug, Deserialize)]
pub struct ServerId {
    #[serde(default)]
    pub name: String,
    pub id: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct ClientInfo {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct ConnectOpts {
    /// The bearer token: a projected ServiceAccount token.
    #[serde(default)]
    pub auth_token: Option<String>,
}

/// Verify and read the server's request: signed by the server whose id
/// it names, for the authorization-request audience, not expired.
pub fn read_request(token: &str, now: i64) -> Result<AuthorizationRequest, CalloutError> {
    let claims = decode_verified(token, Kind::Server)?;
    if claims["aud"].as_str() != Some(REQUEST_AUDIENCE) {
        return Err(CalloutError::Request(format!(
            "audience {} is not {REQUEST_AUDIENCE}",
            claims["aud"]
        )));
    }
    if claims["exp"].as_i64().is_some_and(|exp| exp < now) {
        return Err(CalloutError::Request("request expired".into()));
    }
    if claims["nats"]["type"].as_str() != Some("authorization_request") {
        return Err(CalloutError::Request("not an authorization request".into()));
    }
    let request: AuthorizationRequest = serde_json::from_value(claims["nats"].clone())
        .map_err(|e| CalloutError::Request(format!("authorization request: {e}")))?;
    if claims["iss"].as_str() != Some(request.server_id.id.as_str()) {
        return Err(CalloutError::Request(
            "request not signed by the server it names".into(),
        ));
    }
    match PublicKey::parse(&request.user_nkey) {
        Ok(k) if k.kind == Kind::User => Ok(request),
        _ => Err(CalloutError::Request(
            "user_nkey is not a user public key".into(),
        )),
    }
}

/// Subjects a user may publish and subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The user JWT of a grant: `name`, placed in `account` (the audience in
/// server-config mode), limited to `permissions`, expiring at `expires`
/// (the server disconnects the client then; it reconnects with a fresh token).
pub fn user_claims(
    user_nkey: &str,
    name: &str,
    account: &str,
    permissions: &Permissions,
    expires: i64,
) -> Value {
    json!({
        "sub": user_nkey,
        "aud": account,
        "name": name,
        "exp": expires,
        "nats": {
            "pub": {"allow": permissions.publish},
            "sub": {"allow": permissions.subscribe},
            "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        },
    })
}

/// The response: the signed user JWT, or an error the server logs and
/// the client sees as an authorization violation.
pub fn response_claims(request: &AuthorizationRequest, outcome: Result<String, String>) -> Value {
    let nats = match outcome {
        Ok(user_jwt) => json!({"jwt": user_jwt, "type": "authorization_response", "version": 2}),
        Err(error) => json!({"error": error, "type": "authorization_response", "version": 2}),
    };
    json!({"sub": request.user_nkey, "aud": request.server_id.id, "nats": nats})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_we_sign_verifies_and_a_changed_claim_does_not() {
        let key = AccountKey::generate().expect("key");
        let token = encode(json!({"sub": "x", "nats": {"type": "user"}}), &key, 100);
        let claims = decode_verified(&token, Kind::Account).expect("verifies");
        assert_eq!(claims["sub"], "x");
        assert_eq!(claims["iss"], key.public_key().to_string());
        assert!(claims["jti"].as_str().is_some_and(|j| j.len() > 40));
        let parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(
            String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).expect("b64"))
                .expect("utf8")
                .replace("\"x\"", "\"y\""),
        );
        let err = decode_verified(
            &format!("{}.{forged}.{}", parts[0], parts[2]),
            Kind::Account,
        )
        .expect_err("forged");
        assert!(err.to_string().contains("signature"), "{err}");
        assert!(
            decode_verified(&token, Kind::Server).is_err(),
            "wrong issuer kind"
        );
        assert!(decode_verified("a.b", Kind::Account).is_err());
    }
}
