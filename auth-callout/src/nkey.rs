//! NATS nkeys: ed25519 keys written as base32 with a type prefix and a
//! CRC16 (the format of nats-io/nkeys), on `ring`, which the build already
//! has for TLS. Only what the callout needs: account keys that sign, and
//! public keys (server, user, account) that verify or are named.

use data_encoding::BASE32_NOPAD;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

use crate::error::CalloutError;

/// The kind of a key, by its first character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `A`: signs user JWTs, and the callout's responses.
    Account,
    /// `U`: the identity the server created for the connecting client.
    User,
    /// `N`: a server; signs the authorization requests.
    Server,
    /// `O`: an operator (not used in server-config mode).
    Operator,
}

impl Kind {
    fn prefix(self) -> u8 {
        match self {
            Kind::Account => 0,
            Kind::User => 20 << 3,
            Kind::Server => 13 << 3,
            Kind::Operator => 14 << 3,
        }
    }
    fn from_prefix(byte: u8) -> Option<Kind> {
        [Kind::Account, Kind::User, Kind::Server, Kind::Operator]
            .into_iter()
            .find(|k| k.prefix() == byte)
    }
}

const SEED_PREFIX: u8 = 18 << 3;

/// CRC-16/XMODEM, as nkeys checks it.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

fn encode(prefix: &[u8], key: &[u8; 32]) -> String {
    let mut raw = Vec::with_capacity(prefix.len() + 34);
    raw.extend_from_slice(prefix);
    raw.extend_from_slice(key);
    let crc = crc16(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    BASE32_NOPAD.encode(&raw)
}

fn decode(text: &str, what: &'static str) -> Result<Vec<u8>, CalloutError> {
    let invalid = |why: &str| CalloutError::Key(format!("invalid {what}: {why}"));
    let raw = BASE32_NOPAD
        .decode(text.trim().as_bytes())
        .map_err(|_| invalid("not base32"))?;
    if raw.len() < 3 {
        return Err(invalid("too short"));
    }
    let (body, crc) = raw.split_at(raw.len() - 2);
    if crc16(body).to_le_bytes() != [crc[0], crc[1]] {
        return Err(invalid("checksum mismatch"));
    }
    Ok(body.to_vec())
}

/// A public key of a known kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub kind: Kind,
    bytes: [u8; 32],
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, CalloutError> {
        let body = decode(text, "public key")?;
        let (&prefix, key) = body
            .split_first()
            .ok_or_else(|| CalloutError::Key("invalid public key: empty".into()))?;
        let kind = Kind::from_prefix(prefix)
            .ok_or_else(|| CalloutError::Key("invalid public key: unknown kind".into()))?;
        let bytes: [u8; 32] = key
            .try_into()
            .map_err(|_| CalloutError::Key("invalid public key: wrong length".into()))?;
        Ok(PublicKey { kind, bytes })
    }

    /// Whether `signature` is this key's over `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.bytes)
            .verify(message, signature)
            .is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&encode(&[self.kind.prefix()], &self.bytes))
    }
}

/// An account key pair: the callout's issuer. Its seed is a secret
/// (`tidewatch secrets` writes it; only the callout's pods mount it); the
/// public key is in nats.conf (`auth_callout.issuer`).
pub struct AccountKey {
    seed: [u8; 32],
    pair: Ed25519KeyPair,
}

impl AccountKey {
    /// A new random account key.
    pub fn generate() -> Result<AccountKey, CalloutError> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| CalloutError::Key("no randomness from the OS".into()))?;
        AccountKey::from_raw(seed)
    }

    fn from_raw(seed: [u8; 32]) -> Result<AccountKey, CalloutError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|_| CalloutError::Key("invalid seed".into()))?;
        Ok(AccountKey { seed, pair })
    }

    /// Parse an account seed (`SA...`).
    pub fn from_seed(text: &str) -> Result<AccountKey, CalloutError> {
        let body = decode(text, "seed")?;
        if body.len() != 34 {
            return Err(CalloutError::Key("invalid seed: wrong length".into()));
        }
        let kind = (
            body[0] & 0b1111_1000,
            ((body[0] & 0b111) << 5) | (body[1] >> 3),
        );
        if kind != (SEED_PREFIX, Kind::Account.prefix()) {
            return Err(CalloutError::Key(
                "the issuer seed must be an account seed (SA...)".into(),
            ));
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&body[2..]);
        AccountKey::from_raw(seed)
    }

    /// The seed, `SA...`: write it only to a secret.
    pub fn seed(&self) -> String {
        let kind = Kind::Account.prefix();
        encode(
            &[SEED_PREFIX | (kind >> 5), (kind & 0b1_1111) << 3],
            &self.seed,
        )
    }

    pub fn public_key(&self) -> PublicKey {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey {
            kind: Kind::Account,
            bytes,
        }
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the seed.
        write!(f, "AccountKey({})", self.public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Pairs from nats-server's auth callout tests (server/auth_callout_test.go).
    const ISSUER_SEED: &str = "SAANDLKMXL6CUS3CP52WIXBEDN6YJ545GDKC65U5JZPPV6WH6ESWUA6YAI";
    const ISSUER: &str = "ABJHLOVMPA4CI6R5KLNGOB4GSLNIY7IOUPAJC4YFNDLQVIOBYQGUWVLA";
    const USER: &str = "UBO2MQV67TQTVIRV3XFTEZOACM4WLOCMCDMAWN5QVN5PI2N6JHTVDRON";

    #[test]
    fn an_account_seed_gives_the_public_key_nkeys_gives() {
        let key = AccountKey::from_seed(ISSUER_SEED).expect("seed");
        assert_eq!(key.public_key().to_string(), ISSUER);
        assert_eq!(key.seed(), ISSUER_SEED);
    }

    #[test]
    fn public_keys_round_trip_with_their_kind() {
        let user = PublicKey::parse(USER).expect("user key");
        assert_eq!(user.kind, Kind::User);
        assert_eq!(user.to_string(), USER);
        assert_eq!(
            PublicKey::parse(ISSUER).expect("account").kind,
            Kind::Account
        );
    }

    #[test]
    fn a_changed_character_fails_the_checksum() {
        let mut broken = USER.to_string();
        broken.replace_range(10..11, if &USER[10..11] == "A" { "B" } else { "A" });
        let err = PublicKey::parse(&broken).expect_err("must fail");
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(
            AccountKey::from_seed("SUAP277QP7U4JMFFPVZHLJYEQJ2UHOTYVEIZJYAWRJXQLP4FRSEHYZJJOU")
                .is_err(),
            "a user seed is not an issuer"
        );
    }

    #[test]
    fn signatures_verify_with_the_public_key_only() {
        let key = AccountKey::generate().expect("key");
        let signature = key.sign(b"message");
        assert!(key.public_key().verifies(b"message", &signature));
        assert!(!key.public_key().verifies(b"massage", &signature));
        let other = AccountKey::generate().expect("key");
        assert!(!other.public_key().verifies(b"message", &signature));
        assert!(!format!("{key:?}").contains(&key.seed()));
    }
}
